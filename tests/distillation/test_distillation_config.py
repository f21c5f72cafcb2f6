import pytest
from transformers import HfArgumentParser

from hf_minitron.distillation.config import DistillationConfig


def _config(tmp_path, **kwargs):
    return DistillationConfig(output_dir=str(tmp_path), report_to="none", **kwargs)


def test_defaults_follow_the_papers(tmp_path):
    args = _config(tmp_path)
    assert args.kd_loss == "forward_kl"
    assert args.kd_temperature == 1.0
    assert args.ce_loss_weight == 0.0 and args.kd_loss_weight == 1.0
    assert args.intermediate_layer_mapping is None
    assert args.use_fused_kd_loss is True


@pytest.mark.parametrize(
    ("mapping", "expected"),
    [
        ({3: 7, 1: 3}, [(1, 3), (3, 7)]),
        ([[1, 3], [3, 7]], [(1, 3), (3, 7)]),
        ("1:3,3:7", [(1, 3), (3, 7)]),
        ('{"1": 3, "3": 7}', [(1, 3), (3, 7)]),
        ("", None),
    ],
)
def test_layer_mapping_forms(tmp_path, mapping, expected):
    assert _config(tmp_path, intermediate_layer_mapping=mapping).intermediate_layer_mapping == expected


def test_loss_weight_forms(tmp_path):
    assert _config(tmp_path, intermediate_loss_weight="dynamic").intermediate_loss_weight == "dynamic"
    assert _config(tmp_path, intermediate_loss_weight="0.5").intermediate_loss_weight == 0.5
    assert _config(tmp_path, intermediate_loss_weight=2).intermediate_loss_weight == 2.0


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"kd_loss": "kl"}, "kd_loss"),
        ({"kd_temperature": 0.0}, "kd_temperature"),
        ({"jsd_beta": 1.0}, "jsd_beta"),
        ({"kd_top_k": 0}, "kd_top_k"),
        ({"ce_loss_weight": -1.0}, "ce_loss_weight"),
        ({"kd_loss_weight": 0.0}, "no loss term"),
        ({"intermediate_loss": "l1"}, "intermediate_loss"),
        ({"intermediate_layer_mapping": "1-3"}, "intermediate_layer_mapping"),
        ({"intermediate_layer_mapping": "1:3,1:4"}, "intermediate_layer_mapping"),
        ({"intermediate_layer_mapping": "-1:3"}, "intermediate_layer_mapping"),
        ({"intermediate_loss_weight": "auto"}, "intermediate_loss_weight"),
        ({"intermediate_loss_weight": -2}, "intermediate_loss_weight"),
        ({"kd_chunk_size": 0}, "kd_chunk_size"),
        ({"teacher_model_init_kwargs": "{dtype"}, "teacher_model_init_kwargs"),
        ({"kd_loss_weight": 0.0, "intermediate_layer_mapping": "0:0"}, "dynamic"),
    ],
)
def test_invalid_values_raise_naming_the_field(tmp_path, kwargs, field):
    with pytest.raises(ValueError, match=field):
        _config(tmp_path, **kwargs)


def test_command_line_parsing(tmp_path):
    (args,) = HfArgumentParser(DistillationConfig).parse_args_into_dataclasses(
        [
            "--output_dir", str(tmp_path), "--report_to", "none", "--kd_loss", "jsd", "--jsd_beta", "0.3",
            "--intermediate_layer_mapping", "0:1,1:3", "--intermediate_loss_weight", "0.25",
            "--teacher_model_init_kwargs", '{"dtype": "bfloat16"}',
        ]
    )  # fmt: skip
    assert args.kd_loss == "jsd" and args.jsd_beta == 0.3
    assert args.intermediate_layer_mapping == [(0, 1), (1, 3)]
    assert args.intermediate_loss_weight == 0.25
    assert args.teacher_model_init_kwargs == {"dtype": "bfloat16"}
