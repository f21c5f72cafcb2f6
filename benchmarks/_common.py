"""Helpers shared by the benchmark scripts: the embedded teacher, the offline corpus and the held-out loss."""

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
