"""Mixture-of-Experts families: routed experts, expert width, shared expert, and every dense axis through MoE blocks."""

import copy
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import MOE_ARCHITECTURE_NAMES, TESTS, random_samples, tiny_model
from transformers import AutoModelForCausalLM

from hf_minitron import (
    ImportanceScores,
    PrunedConfig,
    count_parameters,
    estimate_importance,
    prune_model,
    random_importance,
)
from hf_minitron.architectures import get_architecture, get_decoder_layers


IDS = torch.arange(3, 19)[None]


def _calibration():
    return dict(calibration_samples=8, calibration_batch_size=4, depth_calibration_samples=4)


def _axes(moe_type):
    """Targets per axis; OLMoE derives head_dim from hidden / heads, so its hidden size moves with its heads."""
    hidden = (
        dict(hidden_size=16, num_attention_heads=2, num_key_value_heads=1)
        if moe_type == "olmoe"
        else {"hidden_size": 24}
    )
    axes = {
        "experts": {"num_experts": 3},
        "expert_width": {"moe_intermediate_size": 16},
        "hidden": hidden,
        "heads": hidden if moe_type == "olmoe" else {"num_attention_heads": 2},
        "depth": {"num_hidden_layers": 2},
        "all": {"num_experts": 2, "moe_intermediate_size": 16, "num_hidden_layers": 3, **hidden},
    }
    if moe_type == "qwen2_moe":
        axes["shared_expert"] = {"shared_expert_intermediate_size": 24}
        axes["all"]["shared_expert_intermediate_size"] = 24
    if moe_type == "llama4_text":  # one config field sizes its shared and routed experts: both are given
        axes["expert_width"]["shared_expert_intermediate_size"] = 16
        axes["all"]["shared_expert_intermediate_size"] = 16
    if moe_type in ("deepseek_v3", "glm4_moe"):
        # Their first layer is a dense MLP: which layers go decides the parameter count, so depth names them. Their
        # shared MLP is n_shared_experts x the expert width (2 x 24): 24 keeps one, 32 is 2 x the pruned 16.
        axes["depth"] = {"layers_to_drop": [0, 2], "depth_method": "explicit"}
        axes["all"] = {"num_experts": 2, "moe_intermediate_size": 16, "shared_expert_intermediate_size": 32}
        axes["all"] |= {"intermediate_size": 48, "num_attention_heads": 2, "layers_to_drop": [1], **hidden}
        axes["all"]["depth_method"] = "explicit"
        axes["shared_expert"] = {"shared_expert_intermediate_size": 24}
        axes["dense_mlp"] = {"intermediate_size": 48}
    return axes


# JetMoE's axes (its query heads follow its KV heads) are tested in test_jetmoe.py.
CASES = [(m, a) for m in MOE_ARCHITECTURE_NAMES if m != "jetmoe" for a in _axes(m)]


@pytest.mark.parametrize("moe_type,axis", CASES, ids=[f"{m}-{a}" for m, a in CASES])
def test_prune_axis_reloads_with_stock_transformers_and_generates(moe_type, axis, tmp_path):
    model = tiny_model(moe_type)
    source = copy.deepcopy(model.config)
    config = PrunedConfig(**_axes(moe_type)[axis], **_calibration())
    prune_model(model, config, random_samples(8), show_progress=False)

    n = sum(p.numel() for p in model.parameters())
    assert n == count_parameters(source, config) < count_parameters(source)
    fresh = AutoModelForCausalLM.from_config(copy.deepcopy(model.config))
    assert sum(p.numel() for p in fresh.parameters()) == n

    logits = model(IDS).logits
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    torch.testing.assert_close(reloaded(IDS).logits, logits, rtol=0, atol=0)
    cached = reloaded.generate(IDS, max_new_tokens=6, do_sample=False, use_cache=True)
    uncached = reloaded.generate(IDS, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)

    record = model.pruning_record
    if "num_experts" in config.to_dict() and config.num_experts:
        assert all(len(kept) == config.num_experts for kept in record.experts.values())
        moe_layers = [layer for layer in get_decoder_layers(model) if get_architecture(source).has(layer, "moe")]
        assert len(record.experts) == len(moe_layers)
    if config.moe_intermediate_size:
        for per_expert in record.expert_neurons.values():
            assert all(len(kept) == config.moe_intermediate_size for kept in per_expert)


def test_identity_pruning_keeps_logits_exactly(moe_type):
    model = tiny_model(moe_type)
    before = model(IDS).logits
    spec = get_architecture(model.config)
    same = dict(num_experts=getattr(model.config, spec.num_experts_field), hidden_size=model.config.hidden_size)
    prune_model(model, PrunedConfig(**same, **_calibration()), random_samples(8), show_progress=False)
    torch.testing.assert_close(model(IDS).logits, before, rtol=0, atol=0)


def test_kept_experts_are_the_top_scores_and_weights_are_sliced_originals():
    model = tiny_model("gpt_oss")  # transposed, biased, interleaved experts and a router bias
    original = copy.deepcopy(model)
    scores = estimate_importance(model, random_samples(8), PrunedConfig(**_calibration()), show_progress=False)
    expert_scores = scores.expert_scores("reap")  # the default estimator
    prune_model(model, PrunedConfig(num_experts=2, moe_intermediate_size=16), scores=scores)
    for layer in range(4):
        kept = torch.sort(torch.topk(expert_scores[layer], 2).indices).values
        assert model.pruning_record.experts[layer] == kept.tolist()
        src, dst = get_decoder_layers(original)[layer].mlp, get_decoder_layers(model)[layer].mlp
        torch.testing.assert_close(dst.router.weight, src.router.weight[kept])
        torch.testing.assert_close(dst.router.bias, src.router.bias[kept])
        neuron_scores = scores.expert_neuron_scores()[layer][kept]
        for j, e in enumerate(kept.tolist()):
            neurons = torch.sort(torch.topk(neuron_scores[j], 16).indices).values
            assert model.pruning_record.expert_neurons[layer][j] == neurons.tolist()
            columns = torch.stack([2 * neurons, 2 * neurons + 1], dim=1).flatten()  # interleaved gate/up
            torch.testing.assert_close(dst.experts.gate_up_proj[j], src.experts.gate_up_proj[e][:, columns])
            torch.testing.assert_close(dst.experts.gate_up_proj_bias[j], src.experts.gate_up_proj_bias[e][columns])
            torch.testing.assert_close(dst.experts.down_proj[j], src.experts.down_proj[e][neurons])
            torch.testing.assert_close(dst.experts.down_proj_bias[j], src.experts.down_proj_bias[e])


def test_expert_scores_equal_a_direct_computation():
    """Mixtral layout, computed here from the weights with plain torch (no hf-minitron code)."""
    model = tiny_model("mixtral")
    samples = random_samples(8, ragged=True)
    scores = estimate_importance(model, samples, PrunedConfig(**_calibration()), show_progress=False)
    moe = get_decoder_layers(model)[1].mlp
    inputs = []
    handle = moe.register_forward_pre_hook(lambda m, args: inputs.append(args[0].reshape(-1, args[0].shape[-1])))
    norms, weighted = torch.zeros(4, dtype=torch.float64), torch.zeros(4, dtype=torch.float64)
    counts, neuron_sums = torch.zeros(4, dtype=torch.float64), torch.zeros(4, 24, dtype=torch.float64)
    with torch.no_grad():
        for sample in samples:  # one sample at a time: no padding to exclude
            inputs.clear()
            model(input_ids=sample["input_ids"][None])
            x = inputs[0]
            probs = torch.softmax(F.linear(x, moe.gate.weight).float(), dim=-1)
            top_w, top_i = torch.topk(probs, 2, dim=-1)
            top_w = top_w / top_w.sum(-1, keepdim=True)
            for e in range(4):
                token, slot = torch.where(top_i == e)
                gate, up = F.linear(x[token], moe.experts.gate_up_proj[e]).chunk(2, dim=-1)
                act = F.silu(gate) * up
                out = F.linear(act, moe.experts.down_proj[e]).norm(dim=-1).double()
                norms[e] += out.sum()
                weighted[e] += (out * top_w[token, slot].double()).sum()
                counts[e] += len(token)
                neuron_sums[e] += act.abs().double().sum(0)
    handle.remove()
    torch.testing.assert_close(scores.expert_scores("output_norm")[1], norms / counts)
    torch.testing.assert_close(scores.expert_scores("reap")[1], weighted / counts)
    torch.testing.assert_close(scores.expert_scores("frequency")[1], counts)
    torch.testing.assert_close(scores.expert_neuron_scores()[1], neuron_sums / counts[:, None])
    assert counts.sum() == 2 * scores.num_tokens  # every token went to 2 experts, padding excluded


def test_padding_is_excluded_from_expert_statistics():
    model = tiny_model("qwen3_moe")
    samples = random_samples(4, ragged=False)
    padded = [
        {
            "input_ids": torch.cat([s["input_ids"], torch.full((5,), 7)]),
            "attention_mask": torch.cat([s["attention_mask"], torch.zeros(5, dtype=torch.long)]),
        }
        for s in samples
    ]
    config = PrunedConfig(calibration_samples=4, calibration_batch_size=4)
    a = estimate_importance(model, samples, config, show_progress=False)
    b = estimate_importance(model, padded, config, show_progress=False)
    torch.testing.assert_close(a.expert_scores("frequency"), b.expert_scores("frequency"))
    torch.testing.assert_close(a.expert_scores("output_norm"), b.expert_scores("output_norm"), rtol=1e-5, atol=1e-6)


def test_active_parameters_count_top_k_experts():
    model = tiny_model("qwen2_moe")
    config = model.config
    per_expert = sum(p[0].numel() for p in get_decoder_layers(model)[0].mlp.experts.parameters())
    total = count_parameters(config)
    assert total == sum(p.numel() for p in model.parameters())
    assert count_parameters(config, count="active") == total - (4 - 2) * per_expert * 4
    dense = tiny_model("llama").config
    assert count_parameters(dense, count="active") == count_parameters(dense)
    target = PrunedConfig(num_experts=3, moe_intermediate_size=16)
    pruned = prune_model(model, target, scores=random_importance(model.config))
    per_pruned_expert = sum(p[0].numel() for p in get_decoder_layers(pruned)[0].mlp.experts.parameters())
    assert count_parameters(config, target) == sum(p.numel() for p in pruned.parameters())
    assert count_parameters(config, target, "active") == count_parameters(config, target) - per_pruned_expert * 4


@pytest.mark.parametrize("importance", ["magnitude", "random"])
def test_baselines_prune_moe_models(importance, tmp_path):
    model = tiny_model("qwen2_moe")
    config = PrunedConfig(
        num_experts=2, moe_intermediate_size=16, shared_expert_intermediate_size=24, importance=importance
    )
    prune_model(model, config, show_progress=False)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")
    torch.testing.assert_close(reloaded(IDS).logits, model(IDS).logits, rtol=0, atol=0)


def test_moe_scores_save_and_load(tmp_path):
    model = tiny_model("qwen2_moe")
    scores = estimate_importance(model, random_samples(8), PrunedConfig(**_calibration()), show_progress=False)
    scores.save(tmp_path)
    loaded = ImportanceScores.load(tmp_path)
    for name in ("output_norm", "reap", "frequency"):
        torch.testing.assert_close(loaded.expert_scores(name), scores.expert_scores(name))
    torch.testing.assert_close(loaded.expert_neuron_scores(), scores.expert_neuron_scores())
    torch.testing.assert_close(loaded.shared_neuron_scores(), scores.shared_neuron_scores())
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    target = PrunedConfig(num_experts=2, moe_intermediate_size=16)
    prune_model(a, target, scores=scores)
    prune_model(b, target, scores=loaded)
    torch.testing.assert_close(a(IDS).logits, b(IDS).logits, rtol=0, atol=0)


@pytest.mark.parametrize(
    "model_type,fields,message",
    [
        ("mixtral", {"num_experts": 1}, "num_experts_per_tok=2"),
        ("mixtral", {"num_experts": 0}, "positive integer"),
        ("mixtral", {"num_experts": 5}, "larger than the source model's num_experts=4"),
        ("qwen3_moe", {"moe_intermediate_size": 32}, "larger than the source model's moe_intermediate_size=24"),
        ("mixtral", {"intermediate_size": 16}, "moe_intermediate_size"),
        ("mixtral", {"shared_expert_intermediate_size": 16}, "has no a shared expert"),
        ("llama", {"num_experts": 2}, "has no routed experts"),
        ("olmoe", {"hidden_size": 24}, "head_dim"),
    ],
)
def test_bad_moe_targets_are_refused_before_any_work(model_type, fields, message):
    model = tiny_model(model_type)
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        prune_model(model, PrunedConfig(**fields), calibration_data=None)


@pytest.mark.distributed
def test_two_processes_equal_one_process_for_moe_statistics(tmp_path):
    script = os.path.join(str(TESTS), "scripts", "importance_distributed.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29541"]
    result = subprocess.run(cmd + [script, str(tmp_path), "qwen2_moe"], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    distributed = ImportanceScores.load(tmp_path)
    single = estimate_importance(
        tiny_model("qwen2_moe"), random_samples(11), PrunedConfig(calibration_batch_size=2), show_progress=False
    )
    for name in ("output_norm", "reap", "frequency"):
        torch.testing.assert_close(distributed.expert_scores(name), single.expert_scores(name))
    torch.testing.assert_close(distributed.expert_neuron_scores(), single.expert_neuron_scores())
    torch.testing.assert_close(distributed.shared_neuron_scores("var"), single.shared_neuron_scores("var"))


# ---------------------------------------------------------------------------------------------- search
def test_search_over_expert_axes_with_an_active_budget(tmp_path):
    from hf_minitron import SearchConfig, enumerate_candidates, magnitude_importance, search_architectures

    teacher = tiny_model("qwen2_moe")
    space = dict(
        hidden_size_multiple=8,
        moe_intermediate_size_multiple=8,
        shared_expert_intermediate_size_multiple=8,
        max_width_pruning=0.5,
        max_depth_pruning=0.25,
    )
    config = SearchConfig(
        target_ratio=0.7, tolerance=0.1, count="active", pruning={"importance": "magnitude"}, **space
    )
    candidates = enumerate_candidates(teacher.config, config)
    assert candidates and {c.shape["num_experts"] for c in candidates} >= {2, 3, 4}  # top-k 2: never fewer than 2
    assert "intermediate_size" not in candidates[0].shape  # no dense MLP in Qwen2-MoE blocks
    teacher_active = count_parameters(teacher.config, count="active")
    scores = magnitude_importance(teacher)
    for candidate in (candidates[0], candidates[-1]):
        assert abs(candidate.budget_value - 0.7 * teacher_active) <= 0.1 * 0.7 * teacher_active + 1
        pruned = prune_model(copy.deepcopy(teacher), candidate.pruned_config, scores=scores)
        assert candidate.num_parameters == sum(p.numel() for p in pruned.parameters())
        assert candidate.budget_value == count_parameters(teacher.config, candidate.pruned_config, "active")
        assert f"experts{candidate.shape['num_experts']}" in candidate.name

    scorer_calls = []

    def scorer(model):
        scorer_calls.append(model.config.num_experts)
        return float(model.config.num_experts)

    result = search_architectures(
        teacher,
        SearchConfig(**{**config.to_dict(), "retrain_steps": 0, "max_candidates": 3}),
        scores=scores,
        scorer=scorer,
        higher_is_better=True,
        output_dir=tmp_path,
        show_progress=False,
    )
    assert len(scorer_calls) == 3 and result.best.shape["num_experts"] == max(scorer_calls)
    assert "| experts | expert MLP | shared MLP |" in result.to_markdown()


# ---------------------------------------------------------------------------------------------- distillation
def _kd_args(tmp_path, **kwargs):
    from hf_minitron import DistillationConfig

    values = dict(
        output_dir=str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        use_cpu=True,
        disable_tqdm=True,
    )
    return DistillationConfig(**{**values, **kwargs})


def _kd_dataset():
    from datasets import Dataset

    return Dataset.from_list([{k: v.tolist() for k, v in s.items()} for s in random_samples(8)])


def test_distill_a_pruned_moe_student_from_its_moe_teacher_with_the_router_loss(tmp_path):
    from hf_minitron import DistillationTrainer

    teacher = tiny_model("mixtral")
    student = prune_model(
        copy.deepcopy(teacher),
        PrunedConfig(num_experts=3, moe_intermediate_size=16, **_calibration()),
        random_samples(8),
    )
    teacher_before = {n: p.detach().clone() for n, p in teacher.named_parameters()}
    student_before = {n: p.detach().clone() for n, p in student.named_parameters()}
    args = _kd_args(tmp_path, router_aux_loss_coef=0.01)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=_kd_dataset())
    trainer.train()

    logs = [log for log in trainer.state.log_history if "kd_loss" in log]
    assert len(logs) == 3 and all(log["router_aux_loss"] > 0 and log["kd_loss"] > 0 for log in logs)
    # The balancing loss is 1 for perfectly uniform routing (Switch Transformer) and grows with imbalance.
    assert all(0.5 < log["router_aux_loss"] < 3.0 for log in logs)
    assert all(torch.equal(p, teacher_before[n]) for n, p in teacher.named_parameters())
    router = "model.layers.0.mlp.gate.weight"
    assert not torch.equal(dict(student.named_parameters())[router], student_before[router])

    trainer.save_model(str(tmp_path / "final"))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "final", attn_implementation="eager")
    assert reloaded.config.num_local_experts == 3 and reloaded.config.intermediate_size == 16
    torch.testing.assert_close(reloaded(IDS).logits, student.eval()(IDS).logits)


def test_router_loss_adds_its_weighted_value_and_is_refused_for_dense_students(tmp_path):
    from hf_minitron import DistillationTrainer

    teacher = tiny_model("qwen3_moe")
    student = copy.deepcopy(teacher)  # before a trainer freezes the teacher in place
    batch = next(iter(DistillationTrainer(
        model=copy.deepcopy(student), teacher_model=teacher, args=_kd_args(tmp_path), train_dataset=_kd_dataset()
    ).get_train_dataloader()))  # fmt: skip
    tokens = int((batch["labels"][:, 1:] != -100).sum())
    losses = {}
    for coef in (None, 0.5):
        trainer = DistillationTrainer(
            model=copy.deepcopy(student),
            teacher_model=teacher,
            args=_kd_args(tmp_path, router_aux_loss_coef=coef),
            train_dataset=_kd_dataset(),
        )
        trainer.model.train()
        losses[coef] = trainer.compute_loss(trainer.model, batch, num_items_in_batch=tokens)
        aux = trainer._metrics["train"].get("router_aux_loss")
    expected_aux = float(aux[-1]) / tokens  # logged as a token sum
    assert expected_aux > 0.5  # about 1 for uniform routing
    assert float(losses[0.5] - losses[None]) == pytest.approx(0.5 * expected_aux, rel=1e-4)

    dense = tiny_model("llama")
    with pytest.raises(ValueError, match="not a Mixture-of-Experts model"):  # before any training
        DistillationTrainer(
            model=tiny_model("llama", seed=1),
            teacher_model=dense,
            args=_kd_args(tmp_path, router_aux_loss_coef=0.01),
            train_dataset=_kd_dataset(),
        )


def test_prune_a_moe_checkpoint_on_disk(tmp_path, tokenizer, text_file):
    """`hf-minitron prune` on a Mixtral checkpoint: its summary tables count the experts as MLP."""
    from hf_minitron.commands.prune import PruneArguments, prune_checkpoint

    source = tmp_path / "mixtral"
    tiny_model("mixtral").save_pretrained(source)
    tokenizer.save_pretrained(source)
    args = PruneArguments(
        teacher=str(source),
        output_dir=str(tmp_path / "pruned"),
        calibration_data=str(text_file),
        text_column="content",
    )
    config = PrunedConfig(num_experts=2, calibration_samples=4, calibration_batch_size=2, calibration_seq_length=16)
    result = prune_checkpoint(args, config, show_progress=False)
    assert result["after"]["parameters"]["mlp"] < result["before"]["parameters"]["mlp"]
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").config.num_local_experts == 2
