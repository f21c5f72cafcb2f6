import copy
import json

import pytest
import torch
from conftest import random_samples, tiny_config, tiny_model

from hf_minitron import PrunedConfig, prune_model
from hf_minitron.distillation.trainer import DistillationTrainer
from hf_minitron.pruning.candidates import candidate_name, enumerate_candidates
from hf_minitron.pruning.importance import magnitude_importance
from hf_minitron.pruning.parameter_count import count_parameters
from hf_minitron.pruning.search import search_architectures
from hf_minitron.pruning.search_config import SearchConfig
from hf_minitron.pruning.search_results import CandidateResult, SearchResult


# A space that reaches several shapes of the tiny models (hidden 32, MLP 64, 4 layers, 4 heads / 2 KV heads).
SPACE = dict(
    hidden_size_multiple=8,
    intermediate_size_multiple=16,
    max_depth_pruning=0.5,
    max_width_pruning=0.5,
    search_kv_heads=True,
)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny matrices: a second intra-op thread costs more than it saves, a lot more on a loaded 2-core machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _numel(model) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------- parameter counts
@pytest.mark.parametrize(
    "model_type,overrides",
    [
        ("llama", {}),
        ("llama", {"tie_word_embeddings": False}),
        ("qwen2", {}),  # q/k/v biases
        ("qwen3", {}),  # q/k norms
        ("gemma2", {}),  # four norms per layer
        ("phi3", {}),  # fused qkv and gate_up projections
        ("nemotron", {}),  # no gate projection, norms with biases
    ],
)
def test_count_parameters_equals_the_pruned_model(model_type, overrides):
    model = tiny_model(model_type, **overrides)
    assert count_parameters(model.config) == _numel(model)
    scores = magnitude_importance(model)
    candidates = enumerate_candidates(
        model.config, SearchConfig(target_ratio=0.6, tolerance=0.2, pruning={"importance": "magnitude"}, **SPACE)
    )
    # The closest, the farthest, and one that removes KV groups and layers when the space holds one.
    picks = {candidates[0].name: candidates[0], candidates[-1].name: candidates[-1]}
    for candidate in candidates:
        if candidate.shape["num_key_value_heads"] < 2 and candidate.shape["num_hidden_layers"] < 4:
            picks[candidate.name] = candidate
            break
    for candidate in picks.values():
        pruned = prune_model(copy.deepcopy(model), candidate.pruned_config, scores=scores, show_progress=False)
        assert candidate.num_parameters == _numel(pruned) == count_parameters(model.config, candidate.pruned_config)
        embedding = pruned.get_input_embeddings().weight.numel()
        untied = pruned.get_output_embeddings().weight is not pruned.get_input_embeddings().weight
        expected_non_embedding = _numel(pruned) - embedding * (2 if untied else 1)
        assert candidate.num_non_embedding_parameters == expected_non_embedding
        assert count_parameters(model.config, candidate.pruned_config, count="memory", dtype="float32") == sum(
            p.numel() * 4 for p in pruned.parameters()
        )


def test_count_parameters_rejects_unknown_kinds():
    with pytest.raises(ValueError, match="count='weights' is not supported"):
        count_parameters(tiny_config(), count="weights")
    with pytest.raises(ValueError, match="not a torch dtype"):
        count_parameters(tiny_config(), count="memory", dtype="bfloat61")


# ---------------------------------------------------------------------------------------------- enumeration
def test_candidates_respect_budget_multiples_caps_and_groups():
    config = tiny_config()
    search = SearchConfig(target_ratio=0.7, tolerance=0.1, **SPACE)
    candidates = enumerate_candidates(config, search)
    teacher = count_parameters(config)
    target = round(0.7 * teacher)
    assert len(candidates) > 3
    distances = [abs(c.num_parameters - target) for c in candidates]
    assert distances == sorted(distances)  # closest to the budget first
    for c in candidates:
        shape = c.shape
        assert 0.9 * target <= c.num_parameters <= 1.1 * target
        assert shape["hidden_size"] % 8 == 0 and shape["hidden_size"] >= 16
        assert shape["intermediate_size"] % 16 == 0 and shape["intermediate_size"] >= 32
        assert shape["num_hidden_layers"] >= 2
        assert shape["num_attention_heads"] % shape["num_key_value_heads"] == 0
        assert shape["num_attention_heads"] // shape["num_key_value_heads"] <= 2  # a group never gains heads
        assert c.pruned_config.resolve(config) == shape
        assert c.name == "layers{num_hidden_layers}-hidden{hidden_size}-mlp{intermediate_size}-heads" \
            "{num_attention_heads}-kv{num_key_value_heads}".format(**shape)  # fmt: skip
    assert len({c.name for c in candidates}) == len(candidates)
    # KV groups are kept unless searched.
    kept = enumerate_candidates(
        config, SearchConfig(target_ratio=0.7, tolerance=0.1, **{**SPACE, "search_kv_heads": False})
    )
    assert {c.shape["num_key_value_heads"] for c in kept} == {2}
    # Default caps (ModelOpt's): at most 20% of the layers (none of 4) and 40% of each width axis.
    default = enumerate_candidates(config, SearchConfig(target_ratio=0.8, tolerance=0.1, hidden_size_multiple=8,
                                                        intermediate_size_multiple=8))  # fmt: skip
    assert {c.shape["num_hidden_layers"] for c in default} == {4}
    assert min(c.shape["hidden_size"] for c in default) >= 0.6 * 32


def test_candidates_from_grids_counts_and_limits():
    config = tiny_config()
    grid = SearchConfig(
        target_ratio=0.75,
        tolerance=0.3,
        num_hidden_layers_grid=[3, 4],
        hidden_size_grid=[24, 32],
        intermediate_size_grid=[40, 64],
        num_attention_heads_grid=[4],
    )
    candidates = enumerate_candidates(config, grid)
    assert {(c.shape["num_hidden_layers"], c.shape["hidden_size"], c.shape["intermediate_size"]) for c in candidates} <= {
        (layers, hidden, mlp) for layers in (3, 4) for hidden in (24, 32) for mlp in (40, 64)
    }  # fmt: skip
    assert len(enumerate_candidates(config, SearchConfig(**{**grid.to_dict(), "max_candidates": 2}))) == 2
    # Budgets in non-embedding parameters and in bytes.
    non_embedding = SearchConfig(target_ratio=0.6, count="non_embedding", tolerance=0.1, **SPACE)
    for c in enumerate_candidates(config, non_embedding):
        assert c.budget_value == c.num_non_embedding_parameters
    memory = SearchConfig(target_params=100_000, count="memory", memory_dtype="float32", tolerance=0.1, **SPACE)
    for c in enumerate_candidates(config, memory):
        assert c.budget_value == c.memory_bytes == 4 * c.num_parameters
        assert 90_000 <= c.memory_bytes <= 110_000


def test_candidates_loadable_by_stock_transformers():
    # transformers rejects a Llama config whose hidden size is not a multiple of the heads when head_dim is derived;
    # every kept candidate must build.
    from transformers import AutoModelForCausalLM

    from hf_minitron.pruning.prune import check_target_loads

    config = tiny_config()
    for c in enumerate_candidates(config, SearchConfig(target_ratio=0.7, tolerance=0.1, **SPACE))[:5]:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(check_target_loads(config, c.shape))
        assert _numel(model) == c.num_parameters


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({}, "exactly one budget"),
        ({"target_params": 10, "target_ratio": 0.5}, "exactly one budget"),
        ({"target_ratio": 1.5}, "target_ratio=1.5"),
        ({"target_params": -3}, "target_params=-3"),
        ({"target_ratio": 0.5, "count": "flops"}, "count='flops'"),
        ({"target_ratio": 0.5, "tolerance": 0.0}, "tolerance=0.0"),
        ({"target_ratio": 0.5, "tolerance": 1.5}, "tolerance=1.5"),
        ({"target_ratio": 0.5, "max_depth_pruning": 1.0}, "max_depth_pruning=1.0"),
        ({"target_ratio": 0.5, "hidden_size_multiple": 0}, "hidden_size_multiple=0"),
        ({"target_ratio": 0.5, "retrain_steps": -1}, "retrain_steps=-1"),
        ({"target_ratio": 0.5, "hidden_size_grid": []}, "hidden_size_grid"),
        ({"target_ratio": 0.5, "memory_dtype": "bf17"}, "memory_dtype"),
        ({"target_ratio": 0.5, "pruning": {"hidden_size": 16}}, "the search chooses the shape"),
        ({"target_ratio": 0.5, "pruning": {"depth_methd": "lm_loss"}}, "Unknown PrunedConfig field"),
        ({"target_ratio": 0.5, "pruning": "{not json"}, "not valid JSON"),
    ],
)
def test_search_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SearchConfig(**kwargs)


def test_enumeration_errors_name_the_fix():
    config = tiny_config()
    teacher = count_parameters(config)
    with pytest.raises(ValueError, match=r"SearchConfig.target_params asks for .* more than the teacher"):
        enumerate_candidates(config, SearchConfig(target_params=teacher * 2))
    # 20% of the teacher is below what the default caps reach.
    with pytest.raises(ValueError, match=r"No candidate architecture within ±5%.*search space reaches.*tolerance"):
        enumerate_candidates(config, SearchConfig(target_ratio=0.2))
    with pytest.raises(ValueError, match=r"hidden_size_grid holds \[48\], larger than the teacher"):
        enumerate_candidates(config, SearchConfig(target_ratio=0.5, hidden_size_grid=[16, 48]))
    with pytest.raises(ValueError, match="SearchConfig.pruning"):
        SearchConfig.from_dict({"target_ratio": 0.5, "pruning": {"calibration_samples": 0}})
    with pytest.raises(ValueError, match=r"Unknown SearchConfig field\(s\) \['tolerence'\]"):
        SearchConfig.from_dict({"target_ratio": 0.5, "tolerence": 0.1})


# ---------------------------------------------------------------------------------------------- the search
def _search_config(**overrides):
    values = dict(
        target_ratio=0.7,
        tolerance=0.1,
        hidden_size_multiple=8,
        intermediate_size_multiple=16,
        max_width_pruning=0.5,
        max_candidates=3,
        retrain_steps=4,
        eval_interval=2,
        eval_batch_size=4,
        pruning={"calibration_samples": 8, "calibration_batch_size": 4, "depth_calibration_samples": 4},
    )
    return SearchConfig(**{**values, **overrides})


@pytest.fixture(scope="module")
def data():
    return {"train": random_samples(16, seed=1), "eval": random_samples(4, seed=2)}


@pytest.fixture
def count_trainings(monkeypatch):
    calls = []
    original = DistillationTrainer.train

    def train(self, *args, **kwargs):
        calls.append(self.model.config.hidden_size)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(DistillationTrainer, "train", train)
    return calls


def test_search_ranks_retrained_candidates_and_resumes(tmp_path, data, count_trainings, monkeypatch):
    import hf_minitron.pruning.prune as pruning

    importance_passes = []
    compute_scores = pruning.compute_scores
    monkeypatch.setattr(
        pruning, "compute_scores", lambda *a, **k: importance_passes.append(1) or compute_scores(*a, **k)
    )
    teacher = tiny_model("llama")
    before = {name: p.clone() for name, p in teacher.state_dict().items()}
    config = _search_config()
    result = search_architectures(
        teacher, config, train_dataset=data["train"], eval_dataset=data["eval"], output_dir=tmp_path,
        show_progress=False,
    )  # fmt: skip

    # The teacher is untouched: same weights bit for bit, same mode, still trainable.
    assert all(torch.equal(before[name], p) for name, p in teacher.state_dict().items())
    assert not teacher.training and all(p.requires_grad for p in teacher.parameters())

    assert len(count_trainings) == len(result.candidates) == 3
    assert len(importance_passes) == 1  # one importance pass for every candidate
    assert result.steps == [0, 2, 4] and result.metric == "heldout_loss" and not result.higher_is_better
    for step in result.steps:
        ranked = result.ranking(step)
        assert [c.rank[step] for c in ranked] == [1, 2, 3]
        losses = [c.metric[step] for c in ranked]
        assert losses == sorted(losses)
    assert result.best is result.ranking()[0]
    for candidate in result.candidates:
        assert set(candidate.metric) == set(candidate.heldout_loss) == {0, 2, 4}
        assert set(candidate.train_loss) == {2, 4} and candidate.retrained
        assert candidate.metric[4] != candidate.metric[0]  # the students did train
    assert result.stable_step() in result.steps

    # The step-0 loss is the pruned model's own held-out loss, from one shared importance pass.
    from hf_minitron.evaluation import heldout_perplexity
    from hf_minitron.pruning.importance import ImportanceScores

    scores = ImportanceScores.load(tmp_path / "importance")
    first = result.candidates[0]
    pruned = prune_model(copy.deepcopy(teacher), first.pruned_config, data["train"], scores=scores,
                         show_progress=False)  # fmt: skip
    assert heldout_perplexity(pruned, data["eval"], 4)["loss"] == pytest.approx(first.metric[0], rel=1e-6)

    # Reports.
    for suffix in ("json", "md", "png"):
        assert (tmp_path / f"search_results.{suffix}").stat().st_size > 0
    saved = json.loads((tmp_path / "search_results.json").read_text())
    assert {c["name"] for c in saved["candidates"]} == {c.name for c in result.candidates}
    assert saved["candidates"][0]["pruned_config"]["hidden_size"] == result.candidates[0].shape["hidden_size"]
    assert saved["stable_step"] == result.stable_step()
    loaded = SearchResult.load(tmp_path)
    assert loaded.to_dict() == result.to_dict()
    markdown = result.to_markdown()
    assert result.best.name in markdown and "| step 4 |" in markdown

    # A rerun trains nothing, reuses the saved importance, and returns the same result.
    count_trainings.clear()
    importance_passes.clear()
    again = search_architectures(
        teacher, config, train_dataset=data["train"], eval_dataset=data["eval"], output_dir=tmp_path,
        show_progress=False,
    )  # fmt: skip
    assert count_trainings == [] and importance_passes == []
    assert again.to_dict() == result.to_dict()

    # Other settings cannot reuse these results.
    with pytest.raises(ValueError, match="other settings .*retrain_steps"):
        search_architectures(teacher, _search_config(retrain_steps=6), train_dataset=data["train"],
                             eval_dataset=data["eval"], output_dir=tmp_path, show_progress=False)  # fmt: skip


def test_interrupted_search_resumes_at_the_unfinished_candidate(tmp_path, data, monkeypatch):
    teacher = tiny_model("llama")
    config = _search_config(max_candidates=2, retrain_steps=2, eval_interval=2)
    original = DistillationTrainer.train
    calls = []

    def train(self, *args, **kwargs):
        calls.append(self.model.config.to_dict())
        if interrupt and len(calls) == 2:
            raise KeyboardInterrupt  # the second candidate never finishes
        return original(self, *args, **kwargs)

    monkeypatch.setattr(DistillationTrainer, "train", train)
    interrupt = True
    with pytest.raises(KeyboardInterrupt):
        search_architectures(teacher, config, train_dataset=data["train"], eval_dataset=data["eval"],
                             output_dir=tmp_path, show_progress=False)  # fmt: skip
    (done,) = [path.name for path in (tmp_path / "candidates").iterdir()]
    saved = CandidateResult.from_dict(json.loads((tmp_path / "candidates" / done / "result.json").read_text()))

    interrupt, calls[:] = False, []
    result = search_architectures(teacher, config, train_dataset=data["train"], eval_dataset=data["eval"],
                                  output_dir=tmp_path, show_progress=False)  # fmt: skip
    (retrained,) = [candidate_name(shape) for shape in calls]
    assert retrained != done  # only the unfinished candidate is trained again
    assert len(result.candidates) == 2 and all(set(c.metric) == {0, 2} for c in result.candidates)
    assert next(c for c in result.candidates if c.name == done).metric == saved.metric


def test_search_without_retraining_and_with_a_scorer(tmp_path, data, count_trainings, monkeypatch):
    import hf_minitron.pruning.prune as pruning

    teacher = tiny_model("llama")
    scores = magnitude_importance(teacher)
    monkeypatch.setattr(pruning, "compute_scores", None)  # given scores: no importance pass at all
    # ModelOpt-style: rank the pruned candidates as they are; only a scorer, no eval_dataset.
    calls = []

    def scorer(model):
        calls.append(model.config.hidden_size)
        return float(model.config.hidden_size + model.config.intermediate_size / 1000)

    config = _search_config(retrain_steps=0, max_candidates=4, pruning={"importance": "magnitude"})
    result = search_architectures(teacher, config, scores=scores, scorer=scorer, higher_is_better=True,
                                  output_dir=tmp_path, show_progress=False)  # fmt: skip
    assert count_trainings == [] and len(calls) == 4
    assert result.steps == [0] and result.metric == "score" and result.higher_is_better
    values = [c.metric[0] for c in result.ranking()]
    assert values == sorted(values, reverse=True)
    assert result.best.shape["hidden_size"] == max(c.shape["hidden_size"] for c in result.candidates)
    assert result.stable_step() == 0 and "| step 0 |" in result.to_markdown()
    assert (tmp_path / "search_results.png").stat().st_size > 0  # a bar chart: nothing was retrained
    assert all(not c.heldout_loss for c in SearchResult.load(tmp_path).candidates)

    with pytest.raises(ValueError, match="higher_is_better"):
        search_architectures(teacher, config, train_dataset=data["train"], scorer=scorer, show_progress=False)


def test_retrain_top_k_retrains_only_the_best_pruned_candidates(data, count_trainings):
    teacher = tiny_model("llama")
    config = _search_config(retrain_steps=2, eval_interval=2, retrain_top_k=1)
    result = search_architectures(teacher, config, train_dataset=data["train"], eval_dataset=data["eval"],
                                  show_progress=False)  # fmt: skip
    assert len(count_trainings) == 1
    retrained = [c for c in result.candidates if c.retrained]
    assert len(retrained) == 1 and retrained[0].name == result.ranking(0)[0].name
    assert [c.name for c in result.ranking(2)] == [retrained[0].name]
    assert all(set(c.metric) == {0} for c in result.candidates if not c.retrained)


def test_bad_search_input_fails_before_any_work(data, count_trainings, monkeypatch):
    import hf_minitron.pruning.prune as pruning

    def forbidden(*args, **kwargs):
        raise AssertionError("importance was estimated before the input was checked")

    monkeypatch.setattr(pruning, "compute_scores", forbidden)
    teacher = tiny_model("llama")
    config = _search_config()
    with pytest.raises(ValueError, match="needs train_dataset"):
        search_architectures(teacher, config, eval_dataset=data["eval"], show_progress=False)
    with pytest.raises(ValueError, match="pass eval_dataset"):
        search_architectures(teacher, config, train_dataset=data["train"], show_progress=False)
    with pytest.raises(ValueError, match="more than the teacher"):
        search_architectures(teacher, _search_config(target_ratio=None, target_params=10**9),
                             train_dataset=data["train"], eval_dataset=data["eval"], show_progress=False)  # fmt: skip
    with pytest.raises(ValueError, match="No candidate architecture"):
        search_architectures(teacher, _search_config(target_ratio=0.1), train_dataset=data["train"],
                             eval_dataset=data["eval"], show_progress=False)  # fmt: skip
    with pytest.raises(ValueError, match="empty eval_dataset"):
        search_architectures(teacher, config, train_dataset=data["train"], eval_dataset=[], show_progress=False)
    with pytest.raises(ValueError, match="higher_is_better describes a scorer"):
        search_architectures(teacher, config, train_dataset=data["train"], eval_dataset=data["eval"],
                             higher_is_better=True, show_progress=False)  # fmt: skip
    assert count_trainings == []


# ---------------------------------------------------------------------------------------------- results
def _result(metrics: dict[str, dict[int, float]], higher_is_better=False, top_k=2) -> SearchResult:
    candidates = [
        CandidateResult(
            name=name,
            pruned_config=PrunedConfig(),
            shape={},
            parameters={"total": 1},
            budget_value=1,
            metric=dict(values),
        )  # fmt: skip
        for name, values in metrics.items()
    ]
    steps = sorted({s for values in metrics.values() for s in values})
    return SearchResult(candidates, steps, "heldout_loss", higher_is_better, "total", 1, 0.05, {},
                        {"stability_top_k": top_k})  # fmt: skip


def test_ranking_stabilises_when_the_top_order_stops_changing():
    result = _result(
        {
            "a": {0: 3.0, 100: 2.0, 200: 1.5, 300: 1.2, 400: 1.0},
            "b": {0: 2.0, 100: 1.8, 200: 1.4, 300: 1.3, 400: 1.1},
            "c": {0: 2.5, 100: 2.1, 200: 1.9, 300: 1.8, 400: 1.7},
        }
    )
    assert [c.name for c in result.ranking(0)] == ["b", "c", "a"]
    assert [c.name for c in result.ranking()] == ["a", "b", "c"]
    assert result.top_order(200) == ["b", "a"]
    assert result.stable_step() == 300  # from step 300 on, a > b for good
    assert result.rank_correlation(400) == 1.0 and result.rank_correlation(0) == pytest.approx(-0.5)
    assert result.candidates[0].rank == {0: 3, 100: 2, 200: 2, 300: 1, 400: 1}
    flipped = _result({"a": {0: 1.0, 10: 2.0}, "b": {0: 2.0, 10: 1.0}}, higher_is_better=True)
    assert [c.name for c in flipped.ranking()] == ["a", "b"] and flipped.stable_step() == 10
    with pytest.raises(ValueError, match="No candidate was evaluated at step 5"):
        result.ranking(5)
