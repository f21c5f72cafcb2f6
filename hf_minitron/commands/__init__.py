"""What each `hf-minitron <command>` and `recipes/<command>.py` runs: one module per command, each an `*Arguments`
dataclass and one function. `hf_minitron/cli.py` parses the command line into them.

| command | module |
|---|---|
| `run` (the whole chain from one YAML) | `run.py` |
| `prune` | `prune.py` |
| `distill` | `distill.py` |
| `search` | `search.py` |
| `cache-teacher` | `cache_teacher.py` |
| `correct-teacher` | `correct_teacher.py` |
| `sft`, `dpo` | `align.py` |
| `evaluate` | `evaluate.py` |
| `push` | `push.py` |
"""
