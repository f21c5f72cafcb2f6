"""Helpers shared by the benchmark scripts: the embedded teacher, the offline corpus and the held-out loss."""

import time
from pathlib import Path

import torch


RESULTS = Path(__file__).parent / "results"


def num_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def as_tensors(rows) -> list[dict]:
    """Dataset rows as `{"input_ids", "attention_mask"}` tensors, the sample format of `hf_minitron.depth.lm_loss`."""
    return [
        {"input_ids": torch.tensor(r["input_ids"]), "attention_mask": torch.tensor(r["attention_mask"])} for r in rows
    ]


def load_teacher_and_corpus(seq_length: int, max_train_samples: int | None = None):
    """The embedded SmolLM2-135M teacher, its tokenizer and the packed train/validation splits of the offline corpus."""
    from hf_minitron.data import embedded_datasets
    from hf_minitron.embedded import load_default_teacher

    teacher, tokenizer = load_default_teacher()
    teacher.eval()
    return teacher, tokenizer, embedded_datasets(tokenizer, seq_length, max_train_samples)


def held_out_loss(model, validation: list[dict], batch_size: int = 8) -> float:
    """Mean next-token cross-entropy on `validation`, in eval mode (the model's mode is restored)."""
    from hf_minitron.structures.layers import lm_loss

    was_training = model.training
    model.eval()
    try:
        return lm_loss(model, validation, batch_size)
    finally:
        model.train(was_training)


def time_importance(model, calibration, config, repeats: int) -> dict:
    """One activation importance pass (the MoE and hybrid benchmarks), timed against plain forwards of the base model
    on the same batches: interleaved repeats, the min of each. Returns `(timing, scores)`."""
    from hf_minitron import estimate_importance
    from hf_minitron.data import shard_batches, take_samples

    batches = shard_batches(take_samples(calibration, config.calibration_samples), config.calibration_batch_size)
    base = model.model
    with torch.no_grad():
        base(**batches[0], use_cache=False)  # warm-up
    timings = {"base_forward": [], "importance": []}
    scores = None
    for _ in range(repeats):
        start = time.perf_counter()
        with torch.no_grad():
            for batch in batches:
                base(**batch, use_cache=False)
        timings["base_forward"].append(time.perf_counter() - start)
        start = time.perf_counter()
        scores = estimate_importance(model, calibration, config, depth=False, show_progress=False)
        timings["importance"].append(time.perf_counter() - start)
    best = {k: min(v) for k, v in timings.items()}
    return {**best, "all": timings, "importance_over_base_forward": best["importance"] / best["base_forward"]}, scores
