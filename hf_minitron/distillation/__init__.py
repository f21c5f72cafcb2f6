"""Distillation (papers 1 and 2, §3): the student learns the teacher's distribution.

| module | what it holds |
|---|---|
| `config.py` | `DistillationConfig(TrainingArguments)`: the loss and the teacher options |
| `trainer.py` | `DistillationTrainer(Trainer)`: `compute_loss`, one method per step |
| `teachers.py` | the teacher as `compute_loss` uses it: live, sharded (FSDP2 / ZeRO-3) or cached, one interface |
| `losses.py` | the KD losses as pure functions (forward/reverse KL, JSD, top-k, fused with the LM head) |
| `teacher_cache.py` | `cache_teacher` / `load_teacher_cache`: the teacher's outputs stored once, read while training |
| `teacher_cache_format.py` | a cache's files, fingerprints and value encodings; the checks run before it is read |
| `teacher_cache_writer.py` | the teacher's pass, shard by shard, resumable and distributed |
| `teacher_cache_reader.py` | `CachedTeacher` and the batch's teacher columns: what the trainer reads |
| `teacher_correction.py` | `correct_teacher`: fine-tuning the teacher on the distillation data first (paper 2, §2) |
| `on_policy.py` | `OnPolicyConfig`, `build_on_policy_trainer`: on-policy distillation after KD (GKD) on TRL's `DistillationTrainer` |
"""
