"""Writes a tiny teacher cache (9 samples, 3 shards): `python teacher_cache_worker.py OUTPUT [SIGNAL_FILE]`.

With `SIGNAL_FILE`, the writer creates it once it has started the second shard and then hangs, for a test to kill it
there. Under `torchrun --nproc_per_node 2` each process writes its own shards (gloo). Prints the shards it computed.
"""

import os
import sys
import time
from pathlib import Path

import torch.distributed as dist


sys.path.insert(0, __file__.rsplit("/scripts/", 1)[0])
from conftest import random_samples, tiny_model  # noqa: E402

import hf_minitron.distillation.teacher_cache as teacher_cache  # noqa: E402
import hf_minitron.distillation.teacher_cache_writer as teacher_cache_writer  # noqa: E402


def main(output_dir, signal_file=None):
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        dist.init_process_group("gloo")
    real, computed = teacher_cache_writer._write_shard, []

    def write_shard(teacher, rows, path, *args):
        if signal_file is not None and len(computed) == 1:
            Path(signal_file).touch()
            time.sleep(600)  # killed here, mid-shard
        computed.append(path.name)
        return real(teacher, rows, path, *args)

    teacher_cache_writer._write_shard = write_shard
    samples = [{k: v.tolist() for k, v in s.items()} for s in random_samples(9)]
    teacher_cache.cache_teacher(
        tiny_model("llama"), samples, output_dir, shard_size=3, batch_size=2, show_progress=False
    )
    print(f"computed: {computed}", flush=True)
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
