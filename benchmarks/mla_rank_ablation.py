"""What each half of the latent-rank pruning does on real-weight MLA: the score and the norm rescale, apart.

    OMP_NUM_THREADS=1 python benchmarks/mla_rank_ablation.py --threads 1   # ~5 min on one busy core

The model and data are `mla_prune_quality.py`'s (the embedded MLA model, 32 calibration and 16 held-out samples of
128 tokens). Each latent rank (`kv_lora_rank`, `q_lora_rank`) is halved and the held-out loss measured right after
pruning (no KD) for:

* `activation`: the library's pruning, the channel's contribution to the up-projection and the rescaled norm;
* `activation, no rescale`: the same channels, the norm weights only sliced;
* `magnitude` / `random` (mean of 2 seeds), `rescale measured`: the baselines' channels with the rescale from the
  activation pass's pre-norm mean squares, instead of the down-projection's row norms the baselines use alone.

Writes `benchmarks/results/mla_rank_ablation.json` and prints a Markdown table.
"""

import argparse
import copy
import time

import torch
from _common import RESULTS, held_out_loss, split_calibration


def prune_and_measure(teacher, target: dict, scores, validation, rescale: bool = True) -> tuple[float, dict]:
    from hf_minitron import PrunedConfig, prune_model
    from hf_minitron.pruning.structures import latent_attention_heads

    measured = latent_attention_heads.latent_mean_square
    if not rescale:
        latent_attention_heads.latent_mean_square = lambda *args: None
    try:
        student = prune_model(copy.deepcopy(teacher), PrunedConfig(**target), scores=scores, show_progress=False)
    finally:
        latent_attention_heads.latent_mean_square = measured
    return held_out_loss(student, validation), student.pruning_record


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calibration-samples", type=int, default=32)
    parser.add_argument("--validation-samples", type=int, default=16)
    parser.add_argument("--seq-length", type=int, default=128)
    parser.add_argument("--random-seeds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", default=str(RESULTS / "mla_rank_ablation.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()

    from hf_minitron import PrunedConfig, estimate_importance
    from hf_minitron.data import embedded_datasets
    from hf_minitron.embedded.latent_attention import load_embedded_mla
    from hf_minitron.io import atomic_write_json
    from hf_minitron.pruning.importance import magnitude_importance, random_importance

    # Step 1: the model, the data and one activation pass (its pre-norm mean squares serve every arm).
    teacher, tokenizer = load_embedded_mla()
    teacher.eval()
    data = embedded_datasets(tokenizer, args.seq_length)
    calibration, _, validation = split_calibration(data, args.calibration_samples, args.validation_samples)
    activation = estimate_importance(
        teacher, calibration, PrunedConfig(calibration_samples=len(calibration)), depth=False, show_progress=False
    )
    results = {"setup": vars(args), "mla_loss": held_out_loss(teacher, validation), "arms": {}}

    # Step 2: each rank halved, each arm pruned and measured.
    for key, name in (("kv_latent", "kv_lora_rank"), ("q_latent", "q_lora_rank")):
        target = {name: getattr(teacher.config, name) // 2}
        arms = {
            "activation": [prune_and_measure(teacher, target, activation, validation)[0]],
            "activation, no rescale": [prune_and_measure(teacher, target, activation, validation, rescale=False)[0]],
        }
        baselines = {"magnitude": [magnitude_importance(teacher)]}
        baselines["random"] = [random_importance(teacher.config, seed) for seed in range(args.random_seeds)]
        for estimator, all_scores in baselines.items():
            for scores in all_scores:
                getattr(scores, key)["prenorm_sq"] = getattr(activation, key)["prenorm_sq"]
            losses = [prune_and_measure(teacher, target, scores, validation)[0] for scores in all_scores]
            arms[f"{estimator}, rescale measured"] = losses
        for arm, losses in arms.items():
            results["arms"][f"{name}/{arm}"] = {"pruned": sum(losses) / len(losses), "pruned_all": losses}
            print(f"{name} {arm}: {sum(losses) / len(losses):.3f} {losses}", flush=True)
    results["wall_seconds"] = time.perf_counter() - started
    atomic_write_json(args.output, results, indent=1)

    print(f"| target | arm | loss after pruning |\n|---|---|---|  (unpruned MLA {results['mla_loss']:.3f})")
    for arm, values in results["arms"].items():
        target, estimator = arm.split("/")
        print(f"| `{target}` halved | {estimator} | {values['pruned']:.3f} |")


if __name__ == "__main__":
    main()
