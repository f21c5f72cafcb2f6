"""Pruning (papers 1 and 2, §2): what to keep, decided from activations, then sliced in place.

| module | what it holds |
|---|---|
| `config.py` | `PrunedConfig`: the target shape and how importance is measured |
| `importance.py` | `estimate_importance` (one calibration pass, every structure's hooks), `ImportanceScores` |
| `prune.py` | `prune_model`: walks the structures of a family, slices each in place, writes the record |
| `parameter_count.py` | `count_parameters` of a target from a config alone (total and active) |
| `search_config.py` | `SearchConfig`: the budget, the axes and how candidates are retrained and scored |
| `candidates.py` | the candidate shapes within the budget that stock transformers can load |
| `search.py`, `search_results.py` | the architecture search of paper 1 §3: prune, retrain and rank the candidates |
| `summary.py` | before / after shape and parameter tables |
| `verify.py` | the check every pruned model passes: shapes of its own config, and one forward |
| `structures/` | one module per prunable structure (heads, neurons, experts, Mamba heads, hidden channels, depth) |
"""
