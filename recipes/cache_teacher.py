"""Offline teacher: run the teacher once over the distillation data and store its outputs.

Usage (the embedded SmolLM2-135M teacher on the embedded corpus, one process; several processes each write their own
shards of the same cache):

    accelerate launch --config_file recipes/accelerate_configs/single_process.yaml \
        recipes/cache_teacher.py --config recipes/smollm2-135m/cache_teacher.yaml

`--mode hidden` (exact: final hidden states + the teacher's output layer) or `--mode topk --top_k 128`. Distil from
the cache with `DistillationTrainer(model=student, args=args, train_dataset=load_teacher_cache(output_dir))`, no
teacher. Rerunning an interrupted command computes only the missing shards. The same run is
`hf-minitron cache-teacher --config ...`.
"""

import sys

from trl import TrlParser

from hf_minitron.cli import report_errors
from hf_minitron.commands.cache_teacher import CacheTeacherArguments, cache_teacher_checkpoint
from hf_minitron.distillation.teacher_cache import read_cache_info


def main(args: CacheTeacherArguments):
    # 1. Load the teacher and its tokenizer and pack the data; 2. run the teacher once and write the Arrow shards;
    # 3. move the finished cache into place. All three live in the package.
    cache_teacher_checkpoint(args)

    # 4. Report what was written.
    info = read_cache_info(args.output_dir)
    print(
        f"Teacher cache: {info['samples']} samples, {info['tokens']} tokens, mode={info['mode']}, "
        f"{info['bytes_per_token']:.0f} bytes per token: {args.output_dir}"
    )


if __name__ == "__main__":

    def run():
        parser = TrlParser((CacheTeacherArguments,))
        (script_args,) = parser.parse_args_and_config()
        main(script_args)

    # Our errors (a bad value, a missing file, a run made with other settings) as one line, not a traceback.
    sys.exit(report_errors(run))
