import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import random_samples, tiny_model
from transformers import PreTrainedTokenizerFast

from hf_minitron.evaluation import (
    OFFLINE_TASKS,
    PAPER_TASKS,
    TASKS_DIR,
    compare_models,
    evaluate_model,
    format_comparison,
    get_task_manager,
    heldout_perplexity,
    make_lm_eval_scorer,
    make_perplexity_scorer,
    print_comparison,
)


CHAR_VOCAB = 128


def char_tokenizer():
    """A character-level tokenizer over printable ASCII (99 ids), so tiny random models can read real text."""
    from tokenizers import Tokenizer, models

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for code in range(32, 127):
        vocab[chr(code)] = len(vocab)
    # BPE without merges splits every word into characters; anything else maps to <unk>.
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", fuse_unk=True))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


@pytest.fixture(scope="module")
def tokenizer():
    return char_tokenizer()


@pytest.fixture(scope="module")
def task_manager():
    return get_task_manager(OFFLINE_TASKS)


def test_offline_task_data_is_well_formed():
    items = [json.loads(line) for line in (TASKS_DIR / "pydoc_topics" / "pydoc_topics.jsonl").open()]
    assert 100 <= len(items) <= 200
    assert [item["id"] for item in items] == list(range(len(items)))
    for item in items:
        assert len(item["choices"]) == len(set(item["choices"])) == 4
        assert 0 <= item["label"] < 4
        assert len(item["passage"]) >= 120
    # The answer position is spread out, so a position bias cannot score well.
    counts = [sum(item["label"] == k for item in items) for k in range(4)]
    assert max(counts) < 0.4 * len(items)


def test_offline_task_generation_is_deterministic():
    import importlib.util

    spec = importlib.util.spec_from_file_location("generate", TASKS_DIR / "pydoc_topics" / "generate.py")
    generate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generate)
    assert generate.build_items() == generate.build_items()


def test_evaluate_model_on_offline_task(tokenizer, task_manager):
    model = tiny_model("llama", vocab_size=CHAR_VOCAB)
    results = evaluate_model(model, tokenizer, tasks="pydoc_topics", limit=6, batch_size=4, task_manager=task_manager)
    result = results["pydoc_topics"]
    assert result["num_samples"] == 6
    assert result["primary_metric"] == "acc"
    assert result["num_fewshot"] == 0
    assert set(result["metrics"]) == {"acc", "acc_norm"}
    for value in result["metrics"].values():
        assert 0.0 <= value <= 1.0
        assert value * 6 == pytest.approx(round(value * 6))  # a fraction of the 6 documents
    assert "acc" in result["stderr"]


def test_evaluate_model_few_shot_and_raw(tokenizer, task_manager):
    model = tiny_model("qwen2", vocab_size=CHAR_VOCAB)
    model.train()
    results = evaluate_model(
        model,
        tokenizer,
        "pydoc_topics",
        num_fewshot={"pydoc_topics": 1},
        limit=3,
        task_manager=task_manager,
        return_raw=True,
        bootstrap_iters=0,
    )
    assert results["pydoc_topics"]["num_fewshot"] == 1
    assert results["pydoc_topics"]["num_samples"] == 3
    assert results["raw"][0]["n-shot"]["pydoc_topics"] == 1
    assert model.training  # evaluation restores the mode it found


def test_evaluate_model_rejects_bad_arguments(tokenizer, task_manager):
    model = tiny_model("llama", vocab_size=CHAR_VOCAB)
    with pytest.raises(ValueError, match="tasks="):
        evaluate_model(model, tokenizer, tasks=[], task_manager=task_manager)
    with pytest.raises(ValueError, match="num_fewshot"):
        evaluate_model(model, tokenizer, num_fewshot="5", task_manager=task_manager)
    with pytest.raises(ValueError, match="num_fewshot for task 'pydoc_topics'"):
        evaluate_model(model, tokenizer, num_fewshot={"pydoc_topics": -1}, task_manager=task_manager)
    with pytest.raises(ValueError, match="batch_size"):
        evaluate_model(model, tokenizer, batch_size=0, task_manager=task_manager)


def test_paper_tasks_need_lm_eval_defaults():
    assert set(PAPER_TASKS) >= {"mmlu", "winogrande", "arc_challenge", "hellaswag", "gsm8k"}
    assert get_task_manager(OFFLINE_TASKS).all_tasks == ["pydoc_topics"]


def _direct_perplexity(model, samples):
    total, tokens = 0.0, 0
    with torch.no_grad():
        for sample in samples:
            ids = sample["input_ids"][None]
            logits = model(input_ids=ids).logits[0, :-1]
            total += F.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
            tokens += ids.shape[1] - 1
    return total / tokens, tokens


def test_heldout_perplexity_is_exp_of_mean_token_cross_entropy(llama):
    samples = random_samples(n=7, seq_length=12)  # ragged: padding must not count
    loss, tokens = _direct_perplexity(llama, samples)
    for batch_size in (1, 3, 8):
        result = heldout_perplexity(llama, samples, batch_size=batch_size)
        assert result["num_tokens"] == tokens
        assert result["loss"] == pytest.approx(loss, rel=1e-5)
        assert result["perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)


def test_heldout_perplexity_accepts_a_dataset(llama):
    from datasets import Dataset

    samples = random_samples(n=4, seq_length=10, ragged=False)
    dataset = Dataset.from_dict({"input_ids": [s["input_ids"].tolist() for s in samples]})
    assert heldout_perplexity(llama, dataset)["loss"] == pytest.approx(_direct_perplexity(llama, samples)[0], rel=1e-5)
    with pytest.raises(ValueError, match="empty"):
        heldout_perplexity(llama, [])


def test_compare_models_and_tables(tokenizer, task_manager, tmp_path):
    teacher = tiny_model("llama", vocab_size=CHAR_VOCAB, seed=0)
    student = tiny_model("llama", vocab_size=CHAR_VOCAB, seed=1, num_hidden_layers=2)
    heldout = random_samples(n=4, seq_length=12, vocab_size=CHAR_VOCAB)
    comparison = compare_models(
        teacher,
        student,
        tokenizer,
        limit=4,
        batch_size=4,
        heldout_dataset=heldout,
        task_manager=task_manager,
        teacher_name="tiny-teacher",
        student_name="tiny-student",
        output_file=tmp_path / "eval" / "comparison.json",
    )
    assert json.loads((tmp_path / "eval" / "comparison.json").read_text()) == comparison
    assert comparison["tasks"]["pydoc_topics"] == {"metric": "acc", "num_fewshot": 0, "num_samples": 4}
    teacher_entry, student_entry = comparison["models"]["teacher"], comparison["models"]["student"]
    assert teacher_entry["name"] == "tiny-teacher" and student_entry["name"] == "tiny-student"
    assert student_entry["num_parameters"] < teacher_entry["num_parameters"]
    assert teacher_entry["heldout"] == heldout_perplexity(teacher, heldout)
    table = format_comparison(comparison)
    t_acc = teacher_entry["results"]["pydoc_topics"]["metrics"]["acc"]
    s_acc = student_entry["results"]["pydoc_topics"]["metrics"]["acc"]
    assert f"| pydoc_topics (n=4) | acc | 0 | {t_acc:.4f} | {s_acc:.4f} |" in table
    assert f"{teacher_entry['heldout']['perplexity']:.3f}" in table
    assert f"{teacher_entry['num_parameters']:,}" in table
    from rich.console import Console

    console = Console(record=True, width=200)
    print_comparison(comparison, console=console)
    assert "tiny-student" in console.export_text()


def test_lm_eval_scorer(tokenizer, task_manager):
    scorer = make_lm_eval_scorer(tokenizer, "pydoc_topics", limit=4, batch_size=4, task_manager=task_manager)
    model = tiny_model("llama", vocab_size=CHAR_VOCAB)
    score = scorer(model)
    assert 0.0 <= score <= 1.0
    expected = evaluate_model(model, tokenizer, limit=4, num_fewshot=0, task_manager=task_manager)
    assert score == expected["pydoc_topics"]["metrics"]["acc"]
    with pytest.raises(ValueError, match="num_fewshot"):
        make_lm_eval_scorer(tokenizer, num_fewshot=1.5, task_manager=task_manager)


def test_perplexity_scorer_prefers_the_better_model(llama):
    samples = random_samples(n=4, seq_length=12)
    scorer = make_perplexity_scorer(samples)
    assert scorer(llama) == pytest.approx(-heldout_perplexity(llama, samples)["loss"])


@pytest.mark.slow
def test_smollm2_beats_chance_on_offline_task():
    from hf_minitron.embedded import load_default_teacher

    model, tokenizer = load_default_teacher()
    results = evaluate_model(model, tokenizer, limit=48, batch_size=16, bootstrap_iters=0)
    assert results["pydoc_topics"]["num_samples"] == 48
    assert results["pydoc_topics"]["metrics"]["acc"] > 0.25 + 0.1
