"""Distillation (papers 1 and 2, §3): the student learns the teacher's distribution.

| module | what it holds |
|---|---|
| `config.py` | `DistillationConfig(TrainingArguments)`: the loss and the teacher options |
| `trainer.py` | `DistillationTrainer(Trainer)`: the teacher live, sharded or cached, and `compute_loss` |
| `losses.py` | the KD losses as pure functions (forward/reverse KL, JSD, top-k, fused with the LM head) |
| `teacher_cache.py` | `cache_teacher` / `load_teacher_cache`: the teacher's outputs stored once, read while training |
| `teacher_correction.py` | `correct_teacher`: fine-tuning the teacher on the distillation data first (paper 2, §2) |
"""
