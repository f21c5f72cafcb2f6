import pytest
from conftest import tiny_config

from hf_minitron import PrunedConfig


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"hidden_size": 0}, r"PrunedConfig.hidden_size=0 is invalid: expected a positive integer"),
        ({"intermediate_size": -4}, r"PrunedConfig.intermediate_size=-4"),
        ({"num_attention_heads": 2.5}, r"num_attention_heads=2.5"),
        ({"num_hidden_layers": True}, r"num_hidden_layers=True"),
        ({"sequence_aggregation": "max"}, r"sequence_aggregation='max' is not supported: choose one of"),
        ({"batch_aggregation": "median"}, r"batch_aggregation='median'"),
        ({"depth_method": "random"}, r"depth_method='random'"),
        ({"importance": "taylor"}, r"importance='taylor'"),
        ({"calibration_samples": 0}, r"calibration_samples=0"),
        ({"calibration_batch_size": 0}, r"calibration_batch_size=0"),
        ({"depth_calibration_samples": 0}, r"depth_calibration_samples=0"),
        ({"depth_method": "explicit"}, r"needs layers_to_drop"),
        ({"layers_to_drop": [1, 1]}, r"duplicates"),
        ({"num_attention_heads": 6, "num_key_value_heads": 4}, r"not a multiple of num_key_value_heads=4"),
    ],
)
def test_standalone_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PrunedConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"hidden_size": 64}, r"hidden_size=64 is larger than the source model's hidden_size=32"),
        ({"intermediate_size": 65}, r"intermediate_size=65 is larger"),
        ({"num_hidden_layers": 5}, r"num_hidden_layers=5 is larger"),
        ({"num_attention_heads": 3}, r"num_attention_heads=3 is not a multiple of the number of KV heads \(2\)"),
        ({"num_key_value_heads": 4}, r"num_key_value_heads=4 is larger"),
        ({"layers_to_drop": [0, 7]}, r"layers_to_drop contains \[7\], out of range .* 4 layers"),
        ({"layers_to_drop": [0, 1, 2, 3]}, r"removes all 4 layers"),
        ({"num_key_value_heads": 1}, r"keeps 4 query heads per KV group .* groups hold 2"),
        ({"layers_to_drop": [0], "num_hidden_layers": 2}, r"contradicts layers_to_drop"),
    ],
)
def test_validation_against_model(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PrunedConfig(**kwargs).validate_for(tiny_config("llama"))


def test_resolve_fills_source_values():
    target = PrunedConfig(hidden_size=16, layers_to_drop=[1]).resolve(tiny_config("llama"))
    assert target == {
        "num_hidden_layers": 3,
        "hidden_size": 16,
        "intermediate_size": 64,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    }


def test_layers_to_drop_implies_explicit_depth():
    assert PrunedConfig(layers_to_drop=[3, 1]).depth_method == "explicit"
    assert PrunedConfig(layers_to_drop=[3, 1]).layers_to_drop == [1, 3]


def test_json_and_yaml_round_trip(tmp_path):
    config = PrunedConfig(hidden_size=24, num_attention_heads=2, layers_to_drop=[0], head_merge=True, seed=3)
    config.save_pretrained(tmp_path)
    assert PrunedConfig.from_pretrained(tmp_path) == config
    assert PrunedConfig.from_file(tmp_path / "pruned_config.json") == config
    (tmp_path / "c.yaml").write_text(
        "hidden_size: 24\nnum_attention_heads: 2\nlayers_to_drop: [0]\nhead_merge: true\nseed: 3\n"
    )
    assert PrunedConfig.from_file(tmp_path / "c.yaml") == config


def test_unknown_field_is_named(tmp_path):
    (tmp_path / "c.json").write_text('{"hiden_size": 24}')
    with pytest.raises(ValueError, match=r"Unknown PrunedConfig field\(s\) \['hiden_size'\]"):
        PrunedConfig.from_file(tmp_path / "c.json")


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="No PrunedConfig file"):
        PrunedConfig.from_file(tmp_path / "nope.json")
