"""Runs `hf-minitron ARGV...` and reports what its trainers did, optionally pausing so that a test can `kill -9` it.

    python tests/scripts/interrupt_worker.py REPORT.json distill --student ... --output_dir ...

- `MINITRON_TEST_PAUSE_AT_STEP=k`: once checkpoint `k` is on disk (`on_save` runs after `trainer_state.json` is
  written), write `REPORT.json.paused` and sleep, so the SIGKILL lands mid-run, between two steps, at a known step.
- At the end of every `train()`, append `{"trainer", "first_step", "steps_run", "global_step"}` to REPORT.json:
  `first_step > 0` shows that the run resumed from a checkpoint, `steps_run` how many steps it recomputed.

The hook is a `TrainerCallback` added to every `transformers.Trainer` (ours, TRL's and the stock one), so the
command itself runs unchanged. The tests call `main(report, argv, pause_at)` in a process forked by
`tests/scripts/killable.py`, which skips the imports a fresh interpreter pays.
"""

import json
import os
import sys
import time


def main(report_path: str, argv: list[str], pause_at: int = 0) -> int:
    import torch
    import transformers

    from hf_minitron.cli import main as cli_main

    torch.set_num_threads(1)  # the tests run several of these next to each other on two cores

    class Probe(transformers.TrainerCallback):
        def __init__(self, name):
            self.name, self.first_step, self.steps_run = name, None, 0

        def on_step_begin(self, args, state, control, **kwargs):
            if self.first_step is None:
                self.first_step = state.global_step

        def on_step_end(self, args, state, control, **kwargs):
            self.steps_run += 1

        def on_save(self, args, state, control, **kwargs):
            if pause_at and state.global_step == pause_at:
                with open(report_path + ".paused", "w") as f:
                    f.write(str(state.global_step))
                time.sleep(600)  # the test kills us here

        def on_train_end(self, args, state, control, **kwargs):
            runs = json.load(open(report_path)) if os.path.exists(report_path) else []
            runs.append(
                {
                    "trainer": self.name,
                    "first_step": self.first_step,
                    "steps_run": self.steps_run,
                    "global_step": state.global_step,
                }
            )
            with open(report_path, "w") as f:
                json.dump(runs, f)

    original_init = transformers.Trainer.__init__

    def init_with_probe(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        self.add_callback(Probe(type(self).__name__))

    transformers.Trainer.__init__ = init_with_probe
    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2:], int(os.environ.get("MINITRON_TEST_PAUSE_AT_STEP", "0"))))
