"""Runs a short distillation on the tiny test models and saves the student's final weights.

Used by the distributed tests: `torchrun --nproc_per_node 2 tests/distill_worker.py OUT PER_DEVICE_BATCH GA`, and the
same script with one process, must end at the same weights for the same global batch. `SHARD_TEACHER=1` shards the
teacher with FSDP2 over the processes (`shard_teacher`, gloo on CPU) instead of replicating it; `INTERMEDIATE=1` adds
the intermediate-state loss, whose hooks then run on the sharded teacher's layers.
"""

import os
import sys


sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402
from conftest import random_samples, tiny_model  # noqa: E402
from datasets import Dataset  # noqa: E402

from hf_minitron import DistillationConfig, DistillationTrainer  # noqa: E402
from hf_minitron.distillation.trainer import shard_teacher  # noqa: E402


def main(output_dir: str, batch_size: int, accumulation: int) -> None:
    torch.set_num_threads(1)
    teacher = tiny_model("llama", seed=0)
    student = tiny_model("llama", seed=1, num_hidden_layers=2)
    data = Dataset.from_list([{k: v.tolist() for k, v in s.items()} for s in random_samples(8, seq_length=12)])
    args = DistillationConfig(
        output_dir=output_dir,
        max_steps=2,
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation,
        learning_rate=1e-2,
        optim="sgd",
        lr_scheduler_type="constant",
        ce_loss_weight=0.5,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        use_cpu=True,
        ddp_backend="gloo" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
        dataloader_drop_last=True,
        disable_tqdm=True,
        **({"intermediate_layer_mapping": [[0, 1], [1, 3]]} if os.environ.get("INTERMEDIATE") else {}),
    )
    if os.environ.get("SHARD_TEACHER"):
        # The teacher sharded alone (the student stays DDP), to isolate shard_teacher and the intermediate-state hooks
        # on sharded layers; the whole accelerate FSDP2 path is run by tests/test_recipes_distributed.py.
        DistillationTrainer._prepare_teacher = lambda self, teacher: shard_teacher(teacher, "cpu")
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data)
    trainer.train()
    if trainer.accelerator.is_main_process:
        state = {
            k: v.detach().clone() for k, v in trainer.accelerator.unwrap_model(trainer.model).state_dict().items()
        }
        teacher_rows = [p.to_local().shape[0] if hasattr(p, "to_local") else p.shape[0] for p in teacher.parameters()]
        result = {"state": state, "logs": trainer.state.log_history, "teacher_rows": teacher_rows}
        torch.save(result, os.path.join(output_dir, "result.pt"))
    if torch.distributed.is_initialized():
        # Leave together: a process exiting while the other still uses the gloo group can abort in gloo's threads
        # ("terminate called without an active exception"), failing the launch after a successful run.
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
