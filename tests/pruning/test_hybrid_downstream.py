"""Hybrids downstream of the pruning core (issue 13 §2-3): depth by block type (`num_layers_by_type`), per-layer config
lists, the search over Mamba axes, distillation of a hybrid student, the pipeline and its model card."""

import copy
import json

import pytest
import torch
from conftest import HYBRID_PATTERN, random_samples, tiny_config, tiny_model
from datasets import Dataset
from transformers import AutoModelForCausalLM

from hf_minitron import DistillationConfig, DistillationTrainer, PrunedConfig, count_parameters, prune_model
from hf_minitron.architectures import get_decoder_layers
from hf_minitron.pruning.candidates import enumerate_candidates
from hf_minitron.pruning.importance import random_importance
from hf_minitron.pruning.prune import load_pruning_record
from hf_minitron.pruning.search import search_architectures
from hf_minitron.pruning.search_config import SearchConfig
from hf_minitron.pruning.structures.depth import _SkippedLayer, sliced_layer_lists


IDS = torch.arange(3, 19)[None]
BLOCKS = {"linear_attention": "mamba", "full_attention": "attention", "mlp": "mlp"}


def _calibration():
    return dict(calibration_samples=8, calibration_batch_size=4, depth_calibration_samples=4)


def _blocks(config) -> list[str]:
    return [BLOCKS[kind] for kind in config.layers_block_type]


def _check_reloads_and_generates(model, path):
    logits = model(IDS).logits
    model.save_pretrained(path)
    reloaded = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    torch.testing.assert_close(reloaded(IDS).logits, logits, rtol=0, atol=0)
    cached = reloaded.generate(IDS, max_new_tokens=5, do_sample=False, use_cache=True)
    assert torch.equal(cached, reloaded.generate(IDS, max_new_tokens=5, do_sample=False, use_cache=False))
    return reloaded


# ---------------------------------------------------------------------------------------------- depth by block type
@pytest.mark.parametrize("depth_method", ["contiguous", "block_influence", "lm_loss"])
def test_layers_by_type_are_kept_with_the_pattern_and_round_trip(depth_method, tmp_path):
    model = tiny_model("nemotron_h")
    source = copy.deepcopy(model.config)
    # The config's own names of the block types work as well as NVIDIA's.
    by_type = {"mamba": 1, "mlp": 1} if depth_method != "lm_loss" else {"linear_attention": 1, "mlp": 1}
    config = PrunedConfig(num_layers_by_type=by_type, mamba_num_heads=4, depth_method=depth_method, **_calibration())
    prune_model(model, config, random_samples(8), show_progress=False)
    record = model.pruning_record

    assert sorted(_blocks(model.config)) == ["attention", "mamba", "mlp"]
    assert model.config.layers_block_type == [HYBRID_PATTERN[i] for i in record.kept_layers]
    assert model.config.num_hidden_layers == 3 and len(get_decoder_layers(model)) == 3
    if depth_method == "contiguous":
        assert record.dropped_layers in ([2, 3], [3, 4])  # the blocks of 2 holding one Mamba and one MLP layer
    n = sum(p.numel() for p in model.parameters())
    assert n == count_parameters(source, config)
    assert n == count_parameters(source, PrunedConfig(mamba_num_heads=4, layers_to_drop=record.dropped_layers))

    _check_reloads_and_generates(model, tmp_path)
    saved, saved_record = load_pruning_record(tmp_path)
    assert saved == config and saved.num_layers_by_type == by_type
    assert saved_record.kept_layers == record.kept_layers
    assert json.loads((tmp_path / "pruned_config.json").read_text())["num_layers_by_type"] == by_type


def test_block_influence_ranks_layers_within_each_type():
    """Overall, the two lowest layers are the MLP layers 2 and 4; keeping one layer of each type drops the lowest
    Mamba layer (3) and the lowest MLP layer (4) instead."""
    model = tiny_model("nemotron_h")
    scores = random_importance(model.config)
    scores.block_influence = torch.tensor([0.3, 0.9, 0.05, 0.2, 0.01], dtype=torch.float64)
    overall = prune_model(
        copy.deepcopy(model), PrunedConfig(num_hidden_layers=3, depth_method="block_influence"), scores=scores
    )
    assert overall.pruning_record.dropped_layers == [2, 4]
    by_type = PrunedConfig(num_layers_by_type={"mamba": 1, "mlp": 1}, depth_method="block_influence")
    assert prune_model(model, by_type, scores=scores).pruning_record.dropped_layers == [3, 4]


def test_contiguous_by_type_scores_only_the_blocks_that_match():
    model = tiny_model("nemotron_h")
    scored = []

    def scorer(m):
        skipped = [i for i, layer in enumerate(get_decoder_layers(m)) if isinstance(layer, _SkippedLayer)]
        scored.append(skipped)
        return float(skipped == [2, 3])  # higher is better

    config = PrunedConfig(num_layers_by_type={"mamba": 1, "mlp": 1})  # contiguous, by the scorer: no calibration
    prune_model(model, config, scores=random_importance(model.config), depth_scorer=scorer, show_progress=False)
    assert scored == [[2, 3], [3, 4]]
    assert model.pruning_record.dropped_layers == [2, 3]


def test_only_per_layer_config_lists_follow_the_layers(tmp_path):
    """Lists that merely have as many entries as there are layers are not sliced: Nemotron-H's MTP block types, a list
    of EOS ids. Per-layer lists are, and lists of layer indices are renumbered."""
    mtp = ["full_attention", "moe", "mlp", "mlp", "mlp"]
    model = tiny_model("nemotron_h", mtp_layers_block_type=mtp, eos_token_id=[2, 5, 6, 7, 8])
    prune_model(model, PrunedConfig(layers_to_drop=[2, 3]))
    assert model.config.layers_block_type == ["linear_attention", "full_attention", "mlp"]
    assert model.config.mtp_layers_block_type == mtp and model.config.eos_token_id == [2, 5, 6, 7, 8]
    assert tuple(model.config.time_step_limit) == tuple(tiny_config("nemotron_h").time_step_limit)
    _check_reloads_and_generates(model, tmp_path)

    config = tiny_config("qwen2_moe")
    lists = {"mlp_only_layers": [0, 2, 3], "layer_types": ["a", "b", "c", "d"], "eos_token_id": [1, 2, 3, 4]}
    assert sliced_layer_lists(config, lists, [0, 1, 3]) == {"mlp_only_layers": [0, 2], "layer_types": ["a", "b", "d"]}


@pytest.mark.parametrize(
    "fields,message",
    [
        ({"num_layers_by_type": {"mamba": 3}}, "keeps 3 'mamba' layers, more than the model's 2.*<= 2"),
        ({"num_layers_by_type": {"ssm": 1}}, r"names the block type 'ssm'.*'mamba' \(2\), 'attention' \(1\)"),
        ({"num_layers_by_type": {"attention": 0}}, "removes every attention layer.*Keep at least 1"),
        ({"num_layers_by_type": {"mamba": 1, "linear_attention": 1}}, "gives the 'mamba' layers twice"),
        ({"num_layers_by_type": {"mamba": 1}, "num_hidden_layers": 3}, "num_hidden_layers=3 contradicts.*keeps 4"),
        ({"num_layers_by_type": {"mamba": 1}, "layers_to_drop": [2]}, "layers_to_drop=.*contradicts"),
        # Dropping both Mamba layers (0 and 3) takes a block of 2 that holds them alone: there is none.
        (
            {"num_layers_by_type": {"mamba": 0}},
            "no block of 2 consecutive layers holds exactly those.*block_influence",
        ),
    ],
)
def test_bad_layers_by_type_are_refused_before_any_work(fields, message):
    with pytest.raises(ValueError, match=message):
        prune_model(tiny_model("nemotron_h"), PrunedConfig(**fields), calibration_data=None)


@pytest.mark.parametrize(
    "value,message",
    [
        ({"mamba": -1}, "is invalid: expected a mapping of block type"),
        ({"mamba": True}, "is invalid"),
        ({}, "is invalid"),
        ([4, 1], "is invalid"),
        ("{mamba: 1", "is not valid JSON"),
    ],
)
def test_layers_by_type_values_are_checked(value, message):
    with pytest.raises(ValueError, match=f"PrunedConfig.num_layers_by_type=.*{message}"):
        PrunedConfig(num_layers_by_type=value)


def test_layers_by_type_from_the_command_line_and_for_uniform_families():
    assert PrunedConfig(num_layers_by_type='{"mamba": 1}').num_layers_by_type == {"mamba": 1}
    with pytest.raises(ValueError, match="does not apply: the layers of model_type='llama' are all alike"):
        prune_model(tiny_model("llama"), PrunedConfig(num_layers_by_type={"mlp": 2}))


# ---------------------------------------------------------------------------------------------- the search
def _search_config(**kwargs):
    grids = dict(
        hidden_size_grid=[32],
        intermediate_size_grid=[64],
        mamba_num_heads_grid=[4, 8],
        mamba_head_dim_grid=[2, 4],
        num_mamba_layers_grid=[1, 2],
        num_mlp_layers_grid=[1, 2],
    )
    return SearchConfig(**{"target_ratio": 0.8, "tolerance": 0.3, **grids, **kwargs})


def test_search_enumerates_mamba_axes_and_layers_by_type_with_exact_counts():
    model = tiny_model("nemotron_h")
    candidates = enumerate_candidates(model.config, _search_config(pruning={"depth_method": "block_influence"}))
    assert len(candidates) > 4
    assert {c.shape["mamba_num_heads"] for c in candidates} == {4, 8}
    assert {c.shape["num_mamba_layers"] for c in candidates} == {1, 2}
    first = candidates[0]
    assert "mambaheads" in first.name and "mambalayers" in first.name and "layers" not in first.name.split("-")[0]
    scores = random_importance(model.config)
    for candidate in candidates[:4]:
        pruned = prune_model(copy.deepcopy(model), candidate.pruned_config, scores=scores)
        assert sum(p.numel() for p in pruned.parameters()) == candidate.num_parameters
        by_type = candidate.pruned_config.num_layers_by_type
        assert _blocks(pruned.config).count("mamba") == by_type["mamba"] == candidate.shape["num_mamba_layers"]
        assert pruned.config.mamba_num_heads == candidate.shape["mamba_num_heads"]


def test_search_mamba_heads_are_multiples_of_the_groups():
    config = tiny_config("nemotron_h")
    generated = enumerate_candidates(config, SearchConfig(target_ratio=0.9, tolerance=0.2, max_width_pruning=0.5))
    assert {c.shape["mamba_num_heads"] for c in generated} <= {4, 6, 8}  # n_groups=2, at most half removed
    with pytest.raises(ValueError, match=r"mamba_num_heads_grid=\[5, 8\] holds counts that are not multiples"):
        enumerate_candidates(config, _search_config(mamba_num_heads_grid=[5, 8]))
    with pytest.raises(ValueError, match="the search chooses the shape"):
        SearchConfig(target_ratio=0.5, pruning={"num_layers_by_type": {"mamba": 1}})


def test_search_prunes_and_ranks_hybrid_candidates():
    model = tiny_model("nemotron_h")
    config = _search_config(retrain_steps=0, max_candidates=2, pruning={"depth_method": "block_influence"})
    result = search_architectures(
        model, config, eval_dataset=random_samples(4), calibration_data=random_samples(8), show_progress=False
    )
    assert len(result.candidates) == 2 and result.best.metric[0] > 0
    assert "Mamba heads" in result.to_markdown() and "Mamba layers" in result.to_markdown()


# ---------------------------------------------------------------------------------------------- distillation
def test_distilling_a_pruned_hybrid_student(tmp_path):
    """KD and the intermediate-state loss through Nemotron-H's final norm (`norm_f`): the student trains, the teacher
    does not, and the student's cache (attention KV and Mamba conv/SSM states) still generates as without it."""
    from hf_minitron.distillation.trainer import _HeadCapture

    teacher = tiny_model("nemotron_h")
    captured, last = {}, []
    handle = teacher.model.layers[4].register_forward_hook(lambda m, args, out: last.append(out))
    with torch.no_grad(), _HeadCapture(teacher, [4], lambda h, x, s: captured.update(s), False):
        teacher(IDS)
    handle.remove()
    torch.testing.assert_close(captured[4], teacher.model.norm_f(last[0]))

    student = prune_model(
        copy.deepcopy(teacher),
        PrunedConfig(num_layers_by_type={"mamba": 1, "mlp": 1}, mamba_num_heads=4, hidden_size=24, **_calibration()),
        random_samples(8),
        show_progress=False,
    )
    teacher_before = {n: p.detach().clone() for n, p in teacher.named_parameters()}
    student_before = {n: p.detach().clone() for n, p in student.named_parameters()}
    args = DistillationConfig(
        output_dir=str(tmp_path / "run"),
        max_steps=3,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        use_cpu=True,
        disable_tqdm=True,
        intermediate_layer_mapping="0:0,2:4",
    )
    data = Dataset.from_list([{k: v.tolist() for k, v in s.items()} for s in random_samples(8)])
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data)
    trainer.train()

    logs = [log for log in trainer.state.log_history if "kd_loss" in log]
    assert len(logs) == 3 and all(log["kd_loss"] > 0 and log["is_loss"] > 0 for log in logs)
    params = dict(student.named_parameters())  # and the projection of the intermediate states (hidden 24 -> 32)
    unchanged = [name for name, before in student_before.items() if torch.equal(params[name], before)]
    assert not unchanged
    assert all(torch.equal(p, teacher_before[n]) for n, p in teacher.named_parameters())
    trainer.save_model(str(tmp_path / "student"))
    _check_reloads_and_generates(student.eval(), tmp_path / "again")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "student")
    assert reloaded.config.layers_block_type == student.config.layers_block_type


# ---------------------------------------------------------------------------------------------- pipeline and card
def test_pipeline_runs_a_hybrid_and_its_card_shows_the_mamba_axes(tmp_path, tokenizer):
    from hf_minitron.commands.run import run_pipeline
    from hf_minitron.commands.run_config import build_pipeline_config

    teacher = tmp_path / "teacher"
    tiny_model("nemotron_h").save_pretrained(teacher)
    tokenizer.save_pretrained(teacher)
    out = tmp_path / "run"
    recipe = {
        "teacher": str(teacher),
        "output_dir": str(out),
        "seq_length": 32,
        "max_train_samples": 16,
        "max_eval_samples": 4,
        "eval_tasks": "",
        "write_model_card": True,
        "pruning": {
            "mamba_num_heads": 4,
            "mamba_head_dim": 2,
            "hidden_size": 24,
            "num_layers_by_type": {"mamba": 1, "mlp": 1},
            "depth_method": "block_influence",
            "calibration_samples": 8,
            "calibration_seq_length": 32,
        },
        "distillation": {
            "max_steps": 2,
            "per_device_train_batch_size": 2,
            "report_to": "none",
            "logging_steps": 1,
            "save_strategy": "no",
            "learning_rate": 1e-3,
            "use_cpu": True,
        },
    }
    summary = run_pipeline(*build_pipeline_config(recipe), show_progress=False, report=False)
    final = AutoModelForCausalLM.from_pretrained(out / "final")
    assert (final.config.mamba_num_heads, final.config.mamba_head_dim, final.config.hidden_size) == (4, 2, 24)
    assert sorted(_blocks(final.config)) == ["attention", "mamba", "mlp"]
    after = summary["stages"]["pruning"]["after"]
    assert after["num_layers_by_type"] == {"mamba": 1, "attention": 1, "mlp": 1}
    assert summary["stages"]["pruning"]["before"]["mamba_num_heads"] == 8
    card = (out / "final" / "README.md").read_text()
    for row in (
        "| Mamba heads | 8 | 4 | 50% |",
        "| Mamba head dimension | 4 | 2 | 50% |",
        "| Mamba layers | 2 | 1 | 50% |",
        "| Attention layers | 1 | 1 | 100% |",
        "| MLP layers | 2 | 1 | 50% |",
        "| Layers kept per block type | mamba: 1, mlp: 1 |",
        "2504.11409",
    ):
        assert row in card, row


def test_card_counts_layers_by_type_from_full_configs():
    from hf_minitron.model_card import PipelineSummary, render_model_card

    teacher = tiny_config("nemotron_h")
    student = copy.deepcopy(teacher)
    student.layers_block_type = ["linear_attention", "full_attention", "mlp"]
    student.mamba_num_heads = 6
    card = str(render_model_card(PipelineSummary(teacher_config=teacher, student_config=student)))
    assert "| Layers (depth) | 5 | 3 | 60% |" in card and "| Mamba heads | 8 | 6 | 75% |" in card
    assert "| Mamba layers | 2 | 1 | 50% |" in card and "| MLP layers | 2 | 1 | 50% |" in card
