"""The structure modules' contract (`CONTRIBUTING.md`), and what the rest of the package derives from it: every list of
targets, score keys, record entries, search axes and card rows is walked from `STRUCTURES`, so a structure added
without one of its declarations fails here."""

import dataclasses
import typing

import pytest
import torch
from conftest import HYBRID_ARCHITECTURE_NAMES, MOE_ARCHITECTURE_NAMES, random_samples, tiny_config, tiny_model

from hf_minitron import ARCHITECTURES, PrunedConfig, estimate_importance, magnitude_importance, random_importance
from hf_minitron.architectures import get_architecture, model_shape
from hf_minitron.pruning import importance
from hf_minitron.pruning.candidates import searched_axes
from hf_minitron.pruning.config import config_fields, target_fields
from hf_minitron.pruning.importance import ImportanceScores
from hf_minitron.pruning.prune import _LAYER_KEYED, PruningRecord
from hf_minitron.pruning.search_config import SearchConfig
from hf_minitron.pruning.search_results import search_axes
from hf_minitron.pruning.structures import STRUCTURES, WIDTH_STRUCTURES, depth, structures_in, structures_of
from hf_minitron.pruning.structures.fields import ConfigField
from hf_minitron.pruning.structures.search_axis import SearchAxis
from hf_minitron.pruning.summary import shape_summary


# What every structure module defines, and what a width structure (every one but depth) defines besides.
EVERY_STRUCTURE = (
    "CONFIG_FIELDS",
    "FIELDS",
    "shape",
    "AXES",
    "CARD_ROWS",
    "SUMMARY",
    "RECORD",
    "BLOCK",
    "KEY",
    "check_applies",
    "check_target",
)
WIDTH_STRUCTURE = (
    "SCORE_KEYS",
    "present",
    "hooks",
    "sites",
    "score_shapes",
    "collect",
    "random_scores",
    "magnitude_scores",
    "prune",
    "update_config",
    "sync_modules",
    "count_roles",
    "count_sizes",
)
# Tiny models of families with each structure: dense, MoE with a shared expert, a mixture of attention experts, a
# hybrid with Mamba, MoE and MLP layers.
NEMOTRON_H_MOE = dict(
    layers_block_type=["linear_attention", "moe", "full_attention", "mlp", "moe"],
    num_hidden_layers=5,
    n_routed_experts=8,
    n_group=2,
    topk_group=1,
    num_experts_per_tok=2,
    moe_intermediate_size=24,
    moe_shared_expert_intermediate_size=40,
)
FAMILIES = {"llama": {}, "qwen2_moe": {}, "jetmoe": {}, "nemotron_h": NEMOTRON_H_MOE}


def _name(structure) -> str:
    return structure.__name__.rpartition(".")[2]


@pytest.mark.parametrize("structure", STRUCTURES, ids=_name)
def test_every_structure_declares_the_contract(structure):
    names = EVERY_STRUCTURE + (WIDTH_STRUCTURE if structure is not depth else ())
    assert [name for name in names if not hasattr(structure, name)] == []
    assert isinstance(structure.FIELDS, tuple) and structure.FIELDS
    assert all(isinstance(name, str) for name in structure.FIELDS)
    assert not hasattr(structure, "FIELD")  # one spelling: FIELDS
    assert all(isinstance(f, ConfigField) for f in structure.CONFIG_FIELDS)
    # Its targets are its own declared fields, or (JetMoE's attention experts) those another structure declares.
    declared = {f.name for s in STRUCTURES for f in s.CONFIG_FIELDS}
    assert set(structure.FIELDS) <= declared
    assert all(isinstance(axis, SearchAxis) for axis in structure.AXES)
    assert isinstance(structure.CARD_ROWS, dict) and isinstance(structure.SUMMARY, tuple)
    assert isinstance(structure.RECORD, tuple)


def test_the_width_structures_are_every_structure_but_depth():
    assert STRUCTURES[0] is depth
    assert len(set(WIDTH_STRUCTURES)) == len(WIDTH_STRUCTURES)
    assert set(WIDTH_STRUCTURES) == set(STRUCTURES) - {depth}


def test_pruned_config_targets_are_the_union_of_the_structures_fields_in_order():
    union = tuple(dict.fromkeys(name for structure in STRUCTURES for name in structure.FIELDS))
    assert target_fields() == union
    # PrunedConfig's documented integer targets, in the order of the dataclass (the user-facing API).
    # From the class's annotations: transformers' HfArgumentParser rewrites `Field.type` in place (int | None -> int)
    # once any command line has parsed a PrunedConfig in this process.
    hints = typing.get_type_hints(PrunedConfig)
    documented = [
        f.name
        for f in dataclasses.fields(PrunedConfig)
        if hints[f.name] == (int | None) and "target" in f.metadata["help"].lower()
    ]
    assert tuple(documented) == union


def test_user_facing_classes_are_assembled_from_the_structures_declarations():
    """`PrunedConfig`'s fields are the structures' `CONFIG_FIELDS` (then the importance pass's), `SearchConfig`'s
    search space follows every axis, `model_shape` is the union of the structures' `shape`s: nothing lists them."""
    assert [f.name for f in dataclasses.fields(PrunedConfig)] == [f.name for f in config_fields()]
    declared = [f for structure in STRUCTURES for f in structure.CONFIG_FIELDS]
    assert [f.name for f in config_fields()][: len(declared)] == [f.name for f in declared if f.target] + [
        f.name for f in declared if not f.target
    ]
    for f in declared:  # each field's help, default and docstring entry come from its declaration
        (field,) = [g for g in dataclasses.fields(PrunedConfig) if g.name == f.name]
        assert field.metadata["help"] == f.help and field.default == f.default
        assert f"        {f.name} (`" in PrunedConfig.__doc__
    search = {f.name: f for f in dataclasses.fields(SearchConfig)}
    for axis in search_axes():
        assert f"{axis.name}_grid" in search
        assert (f"max_{axis.name}_pruning" in search) == axis.cap
        if axis.multiple and axis.values is None:
            assert search[f"{axis.name}_multiple"].default == axis.multiple_default
        else:
            assert f"{axis.name}_multiple" not in search
    for family, overrides in FAMILIES.items():
        config = tiny_config(family, **overrides)
        spec = get_architecture(config)
        union = {"model_type"} | {key for structure in STRUCTURES for key in structure.shape(config, spec)}
        assert set(model_shape(config)) == union


def test_standalone_validation_checks_every_target():
    for name in target_fields():
        with pytest.raises(ValueError, match=rf"PrunedConfig.{name}=0 is invalid: expected a positive integer"):
            PrunedConfig(**{name: 0})


def test_validation_walks_every_structure(monkeypatch):
    """`PrunedConfig.validate_for` asks each structure whether its targets apply, then what they must satisfy."""
    config, calls = PrunedConfig(), []
    for structure in STRUCTURES:
        monkeypatch.setattr(structure, "check_applies", lambda *args, s=structure: calls.append(("applies", s)))
        monkeypatch.setattr(structure, "check_target", lambda *args, s=structure: calls.append(("target", s)))
    config.validate_for(tiny_config("llama"))
    assert calls == [("applies", s) for s in STRUCTURES] + [("target", s) for s in STRUCTURES]


def test_importance_axes_are_the_width_structures_score_keys():
    keys = {key for structure in WIDTH_STRUCTURES for key in structure.SCORE_KEYS}
    assert set(importance._AXES) == keys and len(importance._AXES) == len(keys)
    # ImportanceScores holds each as a dict of statistics (the user-facing API: `scores.heads`, ...).
    statistics = {f.name for f in dataclasses.fields(ImportanceScores) if f.type == dict[str, torch.Tensor]}
    assert statistics == keys
    # The random baseline's fixed draw order names only score keys (and the layers').
    assert set(importance._RANDOM_DRAWS) <= keys | {depth.KEY}


def test_record_entries_are_the_structures_records():
    entries = {name for structure in STRUCTURES for name in structure.RECORD}
    assert set(_LAYER_KEYED) == entries
    per_layer = {f.name for f in dataclasses.fields(PruningRecord) if str(f.type).startswith("dict[int")}
    assert per_layer == entries


@pytest.mark.parametrize("family", FAMILIES)
def test_scores_hold_the_score_keys_of_the_familys_structures(family):
    model = tiny_model(family, **FAMILIES[family])
    keys = {key for structure in structures_of(get_architecture(model.config)) for key in structure.SCORE_KEYS}
    calibration = PrunedConfig(calibration_samples=4, calibration_batch_size=4)
    for scores in (
        estimate_importance(model, random_samples(4), calibration, show_progress=False),
        magnitude_importance(model),
        random_importance(model.config, seed=1),
    ):
        assert {axis for axis in importance._AXES if getattr(scores, axis)} == keys
        scores.check_compatible(model.config, model)  # every statistic has the shape its structure declares
        shapes = scores._expected_shapes()
        assert keys <= set(shapes)


def test_random_scores_are_drawn_in_the_fixed_order():
    """A seed means a selection: the random baseline's draws follow `_RANDOM_DRAWS`, whatever the structure order."""
    config = tiny_config("jetmoe")
    shape = model_shape(config)
    layers, g = shape["num_hidden_layers"], torch.Generator().manual_seed(7)

    def draw(*dims):
        return torch.rand(layers, *dims, generator=g, dtype=torch.float64)

    hidden, heads, block_influence = draw(shape["hidden_size"]), draw(shape["num_attention_heads"]), draw()
    experts, expert_neurons = draw(shape["num_experts"]), draw(shape["num_experts"], shape["moe_intermediate_size"])
    attention_experts = draw(shape["num_experts"])
    scores = random_importance(config, seed=7)
    assert torch.equal(scores.hidden["score"][:, 0], hidden) and not scores.hidden["score"][:, 1].any()
    assert torch.equal(scores.heads["score"], heads)
    assert torch.equal(scores.block_influence, block_influence)
    assert torch.equal(scores.experts["score"], experts)
    assert torch.equal(scores.expert_neurons["score"], expert_neurons)
    assert torch.equal(scores.attention_experts["score"], attention_experts)


def test_every_axis_has_its_search_config_fields():
    config_fields = {f.name: f for f in dataclasses.fields(SearchConfig)}
    axes = search_axes()
    names = [axis.name for axis in axes]
    assert len(set(names)) == len(names)
    assert {name for name in config_fields if name.endswith("_grid")} == {f"{name}_grid" for name in names}
    multiples = {f"{axis.name}_multiple" for axis in axes if axis.multiple and axis.values is None}
    assert {name for name in config_fields if name.endswith("_multiple")} == multiples
    caps = {name[len("max_") : -len("_pruning")] for name in config_fields if name.endswith("_pruning")}
    assert caps - {"depth", "width"} <= {axis.name for axis in axes if not axis.depth}
    # Every target of every structure is searched, a hybrid's depth also per block type.
    assert set(target_fields()) <= set(names)
    assert {axis.name for axis in depth.BLOCK_TYPE_AXES} <= set(names)


@pytest.mark.parametrize(
    "family", ["llama", "gemma2", *MOE_ARCHITECTURE_NAMES, *HYBRID_ARCHITECTURE_NAMES, "nemotron_h_moe"]
)
def test_search_axes_cover_every_structure_the_family_has(family):
    model_type, overrides = ("nemotron_h", NEMOTRON_H_MOE) if family == "nemotron_h_moe" else (family, {})
    if model_type == "bamba":  # mamba_n_heads x mamba_d_head = mamba_expand (2) x hidden_size
        overrides = dict(
            num_hidden_layers=4, attn_layer_indices=[1], mamba_n_heads=8, mamba_d_head=8, mamba_n_groups=2
        )
    if model_type == "falcon_h1":
        overrides = dict(num_hidden_layers=4, mamba_n_heads=8, mamba_d_head=4, mamba_d_ssm=32, mamba_n_groups=2)
    config = tiny_config(model_type, **overrides)
    spec = ARCHITECTURES[model_type]
    names = {axis.name for axis in searched_axes(config)}
    hybrid = depth.block_names(config) is not None  # Llama 4's MoE / dense layers, DeepSeek-V3's dense then MoE
    blocks = set(depth.block_names(config) or ())
    # A block no block type names is in every layer (attention, and Llama 4's or DeepSeek-V3's).
    typed = dict(spec.block_types) | ({"mlp": "mlp", "moe": "moe"} if spec.dense_layers_field else {})
    for structure in structures_of(spec):
        if hybrid and structure.BLOCK in typed and structure.BLOCK not in blocks:
            continue  # a hybrid searches the structures of the block types its layers name
        assert set(structure.FIELDS) <= names | (set(depth.FIELDS) if hybrid else set()), structure.__name__
    if hybrid:
        assert {f"num_{block}_layers" for block in blocks} <= names and "num_hidden_layers" not in names
    else:
        assert set(depth.FIELDS) <= names


def test_card_and_summary_rows_come_from_the_structures():
    card_keys = {key for structure in STRUCTURES for key in structure.CARD_ROWS}
    assert set(target_fields()) <= card_keys  # every target has its row in the card
    for family in FAMILIES:
        model = tiny_model(family, **FAMILIES[family])
        shape = model_shape(model.config)
        has = {n for s in structures_in(model.config, get_architecture(model.config)) for n in s.SUMMARY}
        rows = [
            name for name in dict.fromkeys(n for s in STRUCTURES for n in s.SUMMARY) if name in shape and name in has
        ]
        by_type = ["num_layers_by_type"] if family == "nemotron_h" else []
        assert list(shape_summary(model)) == [*rows, *by_type, "parameters"]
        # Only the structures the model has: Qwen2-MoE's config holds an intermediate_size no layer uses.
        assert ("intermediate_size" in rows) == (family in ("llama", "nemotron_h"))
        assert ("moe_intermediate_size" in rows) == (family != "llama")


def test_a_hybrid_without_moe_layers_has_no_expert_rows():
    model = tiny_model("nemotron_h")  # mamba, attention and MLP layers: its config still sizes experts
    assert "moe_intermediate_size" in model_shape(model.config)
    assert not {"num_experts", "moe_intermediate_size"} & set(shape_summary(model))


def test_summary_of_a_model_that_lost_every_layer_of_a_block():
    from hf_minitron import prune_model
    from hf_minitron.pruning.summary import comparison_rows

    model = tiny_model("deepseek_v3")  # layer 0 dense, layers 1-3 MoE
    before = shape_summary(model)
    after = shape_summary(prune_model(model, PrunedConfig(layers_to_drop=[0]), show_progress=False))
    assert "intermediate_size" in before and "intermediate_size" not in after
    rows = comparison_rows(before, after)
    assert ("intermediate_size", "64", "-", "-") in rows and ("layers: mlp", "1", "0", "0.00") in rows
