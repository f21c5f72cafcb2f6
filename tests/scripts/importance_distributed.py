"""Run under `torchrun --nproc_per_node 2`: importance over 2 CPU processes (gloo), saved by rank 0."""

import sys

import torch.distributed as dist


sys.path.insert(0, __file__.rsplit("/scripts/", 1)[0])
from conftest import random_samples, tiny_model  # noqa: E402

from hf_minitron import PrunedConfig, estimate_importance  # noqa: E402
from hf_minitron.pruning.structures.depth import lm_loss  # noqa: E402


def main(output_dir, model_type="llama"):
    dist.init_process_group("gloo")
    model = tiny_model(model_type)
    samples = random_samples(11)  # odd on purpose: uneven shards
    scores = estimate_importance(model, samples, PrunedConfig(calibration_batch_size=2), show_progress=False)
    loss = lm_loss(model, samples, batch_size=3)
    if dist.get_rank() == 0:
        scores.base_loss = loss
        scores.save(output_dir)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
