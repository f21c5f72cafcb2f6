"""Choosing the contiguous block to drop by its Block Influence (paper 1, arXiv 2407.14679 §2.2: BI extended to several
contiguous layers, 1 - cos(input of the first, output of the last)) or by a downstream lm-eval task (paper 2, arXiv
2408.11796: the block of best Winogrande accuracy)."""

import copy
import json
import logging
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import TESTS, random_samples, tiny_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_minitron import PrunedConfig, estimate_importance, prune_model
from hf_minitron.commands.prune import PruneArguments, prune_checkpoint
from hf_minitron.commands.run_records import _pruning_settings
from hf_minitron.evaluation import get_task_manager, make_lm_eval_scorer
from hf_minitron.pruning.importance import ImportanceScores, random_importance
from hf_minitron.pruning.structures import depth


BI = dict(contiguous_score="block_influence", calibration_batch_size=4)


def _direct_block_influence(model, samples) -> torch.Tensor:
    """`[first, last]` = 1 - mean over tokens of cos(input of layer first, output of layer last), from
    `output_hidden_states`, one unpadded sample at a time."""
    model = copy.deepcopy(model)
    model.model.norm = torch.nn.Identity()  # the last hidden state is the final norm's output otherwise
    num_layers = model.config.num_hidden_layers
    cos = [[[] for _ in range(num_layers)] for _ in range(num_layers)]
    with torch.no_grad():
        for sample in samples:
            states = model(input_ids=sample["input_ids"][None], output_hidden_states=True).hidden_states
            for first in range(num_layers):
                for last in range(first, num_layers):
                    pair = states[first].float(), states[last + 1].float()
                    cos[first][last].append(F.cosine_similarity(*pair, dim=-1).flatten())
    matrix = torch.zeros(num_layers, num_layers, dtype=torch.float64)
    for first in range(num_layers):
        for last in range(first, num_layers):
            matrix[first, last] = 1 - torch.cat(cos[first][last]).double().mean()
    return matrix


# ---------------------------------------------------------------------------------------------- measurement
def test_block_influence_of_every_block_equals_a_direct_computation():
    model = tiny_model("llama", num_hidden_layers=5)
    samples = random_samples(6)  # ragged: padded tokens must not count
    scores = estimate_importance(model, samples, PrunedConfig(**BI), show_progress=False)
    matrix = scores.block_influence_matrix
    assert matrix.dtype == torch.float64 and matrix.shape == (5, 5)
    torch.testing.assert_close(matrix, _direct_block_influence(model, samples), rtol=1e-5, atol=1e-6)
    assert torch.equal(matrix.diagonal(), scores.block_influence)  # one layer is a block of one
    assert not matrix.tril(-1).any()


def test_half_precision_models_compare_in_float32_a_chunk_of_tokens_at_a_time(monkeypatch):
    model = tiny_model("llama", num_hidden_layers=4).to(torch.bfloat16)
    samples = random_samples(4)
    chunks = []

    def small_chunks(num_tokens, values_per_token):
        chunks.append(num_tokens)
        return [slice(start, start + 5) for start in range(0, num_tokens, 5)]  # not a divisor of the token count

    monkeypatch.setattr(depth, "_token_chunks", small_chunks)
    scores = estimate_importance(model, samples, PrunedConfig(**BI), show_progress=False)
    assert chunks  # the chunked path ran
    torch.testing.assert_close(
        scores.block_influence_matrix, _direct_block_influence(model, samples), rtol=1e-4, atol=1e-5
    )
    assert torch.equal(scores.block_influence_matrix.diagonal(), scores.block_influence)


@pytest.mark.distributed
def test_two_processes_equal_one_process_over_all_data(tmp_path):
    """The block statistics are summed across processes like the others (uneven shards: 11 samples)."""
    script = tmp_path / "blocks.py"
    script.write_text(
        "import sys\n"
        "import torch.distributed as dist\n"
        f"sys.path.insert(0, {str(TESTS)!r})\n"
        "from conftest import random_samples, tiny_model\n"
        "from hf_minitron import PrunedConfig, estimate_importance\n"
        "dist.init_process_group('gloo')\n"
        "config = PrunedConfig(contiguous_score='block_influence', calibration_batch_size=2)\n"
        "scores = estimate_importance(tiny_model('llama'), random_samples(11), config, show_progress=False)\n"
        "if dist.get_rank() == 0:\n"
        "    scores.save(sys.argv[1])\n"
        "dist.barrier()\n"
        "dist.destroy_process_group()\n"
    )
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29547"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [*torchrun, str(script), str(tmp_path / "scores")], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    distributed = ImportanceScores.load(tmp_path / "scores")
    config = PrunedConfig(contiguous_score="block_influence", calibration_batch_size=2)
    single = estimate_importance(tiny_model("llama"), random_samples(11), config, show_progress=False)
    torch.testing.assert_close(distributed.block_influence_matrix, single.block_influence_matrix, rtol=1e-6, atol=1e-8)


def test_unset_options_change_nothing():
    """Without contiguous_score='block_influence' nothing is held or measured, and every other statistic is the same
    with it; the stage record of a run keeps its earlier form (it still resumes)."""
    model = tiny_model("llama", num_hidden_layers=4)
    samples = random_samples(4)
    plain = estimate_importance(model, samples, PrunedConfig(calibration_batch_size=4), show_progress=False)
    blocks = estimate_importance(model, samples, PrunedConfig(**BI), show_progress=False)
    assert plain.block_influence_matrix is None
    plain_tensors, block_tensors = plain._tensors(), blocks._tensors()
    assert set(block_tensors) - set(plain_tensors) == {"block_influence_matrix"}
    for name, tensor in plain_tensors.items():
        assert torch.equal(tensor, block_tensors[name]), name
    defaults = PrunedConfig()
    assert (defaults.contiguous_score, defaults.depth_scorer) == ("lm_loss", None)
    new_fields = {"contiguous_score", "depth_scorer", "depth_scorer_num_fewshot", "depth_scorer_limit"}
    assert not new_fields & set(_pruning_settings(defaults))
    assert _pruning_settings(PrunedConfig(contiguous_score="block_influence"))["contiguous_score"] == "block_influence"


def test_scores_round_trip_and_older_scores_load(tmp_path):
    model = tiny_model("llama", num_hidden_layers=4)
    samples = random_samples(4)
    scores = estimate_importance(model, samples, PrunedConfig(**BI), show_progress=False)
    scores.save(tmp_path / "new")
    loaded = ImportanceScores.load(tmp_path / "new")
    assert torch.equal(loaded.block_influence_matrix, scores.block_influence_matrix)
    config = PrunedConfig(num_hidden_layers=2, **BI)
    dropped = prune_model(copy.deepcopy(model), config, scores=scores).pruning_record.dropped_layers
    assert prune_model(copy.deepcopy(model), config, scores=loaded).pruning_record.dropped_layers == dropped

    # Scores saved before this field existed hold no such tensor: they load, and are refused only where it is needed.
    older = estimate_importance(model, samples, PrunedConfig(calibration_batch_size=4), show_progress=False)
    older.save(tmp_path / "old")
    old = ImportanceScores.load(tmp_path / "old")
    assert old.block_influence_matrix is None
    with pytest.raises(ValueError, match="estimate them with a PrunedConfig whose contiguous_score='block_influence'"):
        prune_model(copy.deepcopy(model), config, scores=old)

    loaded.block_influence_matrix = loaded.block_influence_matrix[:3, :3]
    with pytest.raises(ValueError, match=r"block_influence_matrix has shape \(3, 3\), but this model needs \(4, 4\)"):
        loaded.check_compatible(model.config)


# ---------------------------------------------------------------------------------------------- selection
def test_contiguous_block_of_lowest_block_influence_is_dropped_without_scoring_removals(monkeypatch):
    model = tiny_model("llama", num_hidden_layers=6)
    samples = random_samples(6)
    config = PrunedConfig(num_hidden_layers=3, **BI)
    scores = estimate_importance(model, samples, config, show_progress=False)
    costs = [float(scores.block_influence_matrix[s, s + 2]) for s in range(4)]
    assert depth.block_influences(scores, 3) == costs
    start = min(range(4), key=costs.__getitem__)

    def no_removal_scoring(*args, **kwargs):
        raise AssertionError("Block Influence needs no forward per candidate block")

    monkeypatch.setattr(depth, "lm_loss", no_removal_scoring)
    assert prune_model(copy.deepcopy(model), config, scores=scores).pruning_record.dropped_layers == [
        start,
        start + 1,
        start + 2,
    ]
    # Without precomputed scores, prune_model measures them in its importance pass.
    pruned = prune_model(copy.deepcopy(model), config, samples, show_progress=False)
    assert pruned.pruning_record.dropped_layers == [start, start + 1, start + 2]


def test_hybrid_blocks_by_type_are_ranked_by_block_influence():
    """Keeping one Mamba and one MLP layer fewer leaves the blocks of 2 holding one of each, [2, 3] and [3, 4]: the
    block of lowest BI overall ([0, 1], Mamba + attention) does not match."""
    model = tiny_model("nemotron_h")
    measured = estimate_importance(model, random_samples(4), PrunedConfig(**BI), show_progress=False)
    assert torch.equal(measured.block_influence_matrix.diagonal(), measured.block_influence)

    scores = random_importance(model.config)
    matrix = torch.full((5, 5), 0.5, dtype=torch.float64).triu()
    matrix[0, 1], matrix[2, 3], matrix[3, 4] = 0.01, 0.4, 0.2
    scores.block_influence_matrix = matrix
    config = PrunedConfig(num_layers_by_type={"mamba": 1, "mlp": 1}, **BI)
    assert prune_model(copy.deepcopy(model), config, scores=scores).pruning_record.dropped_layers == [3, 4]
    matrix[2, 3] = 0.1
    assert prune_model(model, config, scores=scores).pruning_record.dropped_layers == [2, 3]


# ---------------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(contiguous_score="cosine"), r"contiguous_score='cosine' is not supported: choose one of \['lm_loss'"),
        (dict(contiguous_score="block_influence", depth_method="lm_loss"), "ranks the blocks of depth_method="),
        (dict(contiguous_score="block_influence", layers_to_drop=[1]), r"'explicit' \(set by layers_to_drop\)"),
        (dict(contiguous_score="block_influence", importance="magnitude"), "is measured on activations"),
        (dict(depth_scorer=" , "), "depth_scorer=' , ' is invalid: expected lm-eval task names"),
        (dict(depth_scorer="winogrande", depth_method="block_influence"), "scores the candidate removals"),
        (dict(depth_scorer="winogrande", contiguous_score="block_influence"), "set only one of them"),
        (dict(depth_scorer="winogrande", importance="random"), "applies with importance='activation'"),
        (dict(depth_scorer_limit=0), "depth_scorer_limit=0 is invalid"),
        (dict(depth_scorer_limit=True), "depth_scorer_limit=True is invalid"),
        (dict(depth_scorer_num_fewshot=-1), "depth_scorer_num_fewshot=-1 is invalid"),
    ],
)
def test_bad_depth_scoring_options_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PrunedConfig(**kwargs)


def test_depth_scorer_options_parse_and_prune_model_asks_for_the_scorer():
    assert PrunedConfig(depth_scorer="").depth_scorer is None  # `--depth_scorer ""` on the command line
    config = PrunedConfig(num_hidden_layers=2, depth_scorer="winogrande, hellaswag", depth_scorer_num_fewshot=None)
    assert config.depth_scorer_tasks() == ["winogrande", "hellaswag"]
    assert PrunedConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ValueError, match=r"needs the model's tokenizer: pass depth_scorer=make_lm_eval_scorer"):
        prune_model(tiny_model("llama"), config, random_samples(4))
    with pytest.raises(ValueError, match="pass only one"):
        prune_model(tiny_model("llama"), PrunedConfig(num_hidden_layers=2, **BI), depth_scorer=lambda m: 0.0)


# ---------------------------------------------------------------------------------------------- downstream scorer
CHOICES = ["a", "i", "t"]  # one token each after a space in the test tokenizer (" a" is "Ġa")


def _write_task(tmp_path, model, tokenizer, best_block) -> str:
    """A local multiple-choice lm-eval task (no download) whose answers are the choices the model prefers with
    `best_block` skipped: that block scores 1.0, the others whatever their predictions share with it."""
    g = torch.Generator().manual_seed(0)
    words = "the of and to in is for with on as by from".split()
    questions = [" ".join(words[i] for i in torch.randint(len(words), (6,), generator=g)) for _ in range(24)]
    choice_ids = [tokenizer.convert_tokens_to_ids("Ġ" + c) for c in CHOICES]
    with depth.layers_skipped(model, best_block), torch.no_grad():
        labels = []
        for question in questions:
            ids = tokenizer(question, return_tensors="pt")["input_ids"]
            labels.append(int(model(input_ids=ids).logits[0, -1, choice_ids].argmax()))
    data = tmp_path / "tiny_choice.jsonl"
    data.write_text(
        "".join(json.dumps({"question": q, "choices": CHOICES, "label": y}) + "\n" for q, y in zip(questions, labels))
    )
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "tiny_choice.yaml").write_text(
        "task: tiny_choice\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "output_type: multiple_choice\n"
        "test_split: test\n"
        'doc_to_text: "{{question}}"\n'
        "doc_to_choice: choices\n"
        "doc_to_target: label\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return str(tasks)


def test_depth_scorer_from_the_recipe_picks_the_block_the_task_ranks_best(tmp_path, checkpoint, text_file, caplog):
    """`depth_scorer` in a prune recipe (PrunedConfig) scores every candidate block with a local lm-eval task; the
    dropped block is the one that calling the scorer on each candidate directly ranks best."""
    model = AutoModelForCausalLM.from_pretrained(checkpoint, attn_implementation="eager").eval()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    include_path = _write_task(tmp_path, model, tokenizer, best_block=[1, 2])

    scorer = make_lm_eval_scorer(tokenizer, "tiny_choice", task_manager=get_task_manager("tiny_choice", include_path))
    direct = []
    for start in range(3):
        with depth.layers_skipped(model, [start, start + 1]):
            direct.append(scorer(model))
    assert direct[1] == 1.0 and max(direct[0], direct[2]) < 1.0  # the task separates the blocks

    args = PruneArguments(
        teacher=str(checkpoint),
        output_dir=str(tmp_path / "pruned"),
        calibration_data=str(text_file),
        text_column="content",
        save_scores=False,
        lm_eval_include_path=include_path,
    )
    config = PrunedConfig(
        num_hidden_layers=2, depth_scorer="tiny_choice", calibration_samples=4, calibration_seq_length=32
    )
    with caplog.at_level(logging.INFO, logger=depth.__name__):
        prune_checkpoint(args, config, show_progress=False)
    record = json.loads((tmp_path / "pruned" / "pruning_record.json").read_text())
    assert record["dropped_layers"] == [1, 2] == [direct.index(max(direct)), direct.index(max(direct)) + 1]
    assert "Scoring 3 candidate layer removals with the depth scorer: one evaluation each" in caplog.text
    assert json.loads((tmp_path / "pruned" / "pruned_config.json").read_text())["depth_scorer"] == "tiny_choice"


def test_unknown_depth_scorer_task_is_refused_before_the_weights_load(tmp_path, checkpoint, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("the weights were loaded before the task name was checked")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_loading)
    (tmp_path / "tasks").mkdir()
    args = PruneArguments(
        teacher=str(checkpoint), output_dir=str(tmp_path / "out"), lm_eval_include_path=str(tmp_path / "tasks")
    )
    config = PrunedConfig(num_hidden_layers=2, depth_scorer="winogrand", calibration_seq_length=32)
    with pytest.raises(ValueError, match="Unknown lm-eval task.*'winogrand' \\(did you mean 'winogrande'"):
        prune_checkpoint(args, config, show_progress=False)


def test_pipeline_checks_the_depth_scorer_tasks_before_any_stage(tmp_path, checkpoint, monkeypatch):
    from hf_minitron import evaluation
    from hf_minitron.commands.run import run_pipeline
    from hf_minitron.commands.run_config import build_pipeline_config

    def refuse(tasks, *args, **kwargs):
        raise ValueError(f"checked {tasks}")

    monkeypatch.setattr(evaluation, "check_task_names", refuse)
    recipe = {
        "teacher": str(checkpoint),
        "output_dir": str(tmp_path / "run"),
        "seq_length": 32,
        "eval_tasks": "",
        "correct_teacher": True,  # the first stage, hours before pruning on a real model
        "pruning": {"num_hidden_layers": 2, "depth_scorer": "winogrande", "depth_scorer_limit": 100},
        "distillation": {"max_steps": 1, "report_to": "none"},
        "teacher_correction": {"max_steps": 1, "report_to": "none"},
    }
    with pytest.raises(ValueError, match=r"checked \['winogrande'\]"):
        run_pipeline(*build_pipeline_config(recipe), show_progress=False, report=False)
    assert not (tmp_path / "run").exists()
