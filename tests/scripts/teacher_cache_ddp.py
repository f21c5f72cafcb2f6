"""Distils the tiny student from a teacher cache and saves its final weights: `python teacher_cache_ddp.py CACHE OUT
PER_DEVICE_BATCH`, or under `torchrun --nproc_per_node 2` (DDP, gloo) with half the per-device batch."""

import os
import sys

import torch


sys.path.insert(0, __file__.rsplit("/scripts/", 1)[0])
from conftest import tiny_model  # noqa: E402

from hf_minitron import DistillationConfig, DistillationTrainer, load_teacher_cache  # noqa: E402


def main(cache_dir: str, output_dir: str, batch_size: str) -> None:
    torch.set_num_threads(1)
    args = DistillationConfig(
        output_dir=output_dir, max_steps=2, per_device_train_batch_size=int(batch_size), learning_rate=1e-2,
        optim="sgd", lr_scheduler_type="constant", ce_loss_weight=0.5, report_to="none", save_strategy="no",
        logging_steps=1, use_cpu=True, ddp_backend="gloo" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
        dataloader_drop_last=True, disable_tqdm=True,
    )  # fmt: skip
    student = tiny_model("llama", seed=1, num_hidden_layers=2)
    trainer = DistillationTrainer(model=student, args=args, train_dataset=load_teacher_cache(cache_dir))
    trainer.train()
    if trainer.accelerator.is_main_process:
        state = {
            k: v.detach().clone() for k, v in trainer.accelerator.unwrap_model(trainer.model).state_dict().items()
        }
        torch.save({"state": state, "logs": trainer.state.log_history}, os.path.join(output_dir, "result.pt"))
    if torch.distributed.is_initialized():
        # Leave together (see tests/distill_worker.py): a process exiting mid-use of the gloo group can abort.
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
