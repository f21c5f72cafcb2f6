"""Starts one of our saves and blocks in the middle of it, so that a test can `kill -9` the process there.

    python tests/scripts/kill_mid_save.py prune TARGET MARKER CHECKPOINT CALIBRATION.jsonl
    python tests/scripts/kill_mid_save.py scores TARGET MARKER
    python tests/scripts/kill_mid_save.py json TARGET MARKER

- `prune`: `hf-minitron prune ... --output TARGET --overwrite true`, with the model saved in small shards; blocks
  right after the first shard file is written.
- `scores`: `ImportanceScores.save(TARGET)` of a tiny model's scores; blocks after `importance.safetensors`.
- `json`: `hf_minitron.evaluation.save_json` of a results dict; blocks after writing the first half of the text.

When blocked, it writes MARKER (its pid) and sleeps; the test kills it.
"""

import os
import pathlib
import sys
import time


sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def block(marker: str) -> None:
    with open(marker, "w") as f:
        f.write(str(os.getpid()))
    time.sleep(600)


def after_first_call(function, marker):
    def wrapper(*args, **kwargs):
        result = function(*args, **kwargs)
        block(marker)
        return result

    return wrapper


def main(mode: str, target: str, marker: str, *rest: str) -> int:
    if mode == "prune":
        import transformers.modeling_utils as modeling_utils

        from hf_minitron.cli import main as cli_main

        checkpoint, calibration = rest
        modeling_utils.safe_save_file = after_first_call(modeling_utils.safe_save_file, marker)
        save_pretrained = modeling_utils.PreTrainedModel.save_pretrained

        def sharded(self, *args, **kwargs):
            kwargs.setdefault("max_shard_size", "20KB")  # several shard files, so the first one is half the model
            return save_pretrained(self, *args, **kwargs)

        modeling_utils.PreTrainedModel.save_pretrained = sharded
        return cli_main(
            ["prune", "--teacher", checkpoint, "--calibration_data", calibration, "--text_column", "content"]
            + ["--hidden_size", "24", "--intermediate_size", "48", "--num_attention_heads", "2"]
            + ["--calibration_samples", "4", "--calibration_seq_length", "16"]
            + ["--output_dir", target, "--overwrite", "true"]
        )
    if mode == "scores":
        import safetensors.torch
        from conftest import random_samples, tiny_model

        from hf_minitron.pruning.importance import estimate_importance

        scores = estimate_importance(tiny_model("llama", seed=3), random_samples(4), show_progress=False)
        safetensors.torch.save_file = after_first_call(safetensors.torch.save_file, marker)
        scores.save(target)
        return 0
    if mode == "json":
        from hf_minitron.evaluation import save_json

        write_text = pathlib.Path.write_text

        def half_then_block(self, text, *args, **kwargs):
            write_text(self, text[: len(text) // 2], *args, **kwargs)
            block(marker)

        pathlib.Path.write_text = half_then_block
        save_json({"models": {"student": {"heldout": {"loss": 1.0}}}, "new": list(range(500))}, target)
        return 0
    raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
