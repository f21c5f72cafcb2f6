"""What each `hf-minitron <command>` and `recipes/<command>.py` runs: one module per command, each an `*Arguments`
dataclass and one function. `hf_minitron/cli.py` parses the command line into them.

| command | module |
|---|---|
| `run` (the whole chain from one YAML) | `run.py` (the stages), `run_config.py` (the recipe), `run_records.py` (what is reused), `run_console.py` (what it prints) |
| `prune` | `prune.py` |
| `distill` | `distill.py` |
| `on-policy` | `on_policy.py` |
| `search` | `search.py` |
| `cache-teacher` | `cache_teacher.py` |
| `correct-teacher` | `correct_teacher.py` |
| `sft`, `dpo` | `align.py` |
| `evaluate` | `evaluate.py` |
| `push` | `push.py` |
"""
