"""Pruning real-weight multi-head latent attention: which estimator keeps it best, before and after a short KD.

    OMP_NUM_THREADS=1 python benchmarks/mla_prune_quality.py --threads 1   # default budget: 41 min on one busy core
    python benchmarks/mla_prune_quality.py --kd-steps 0                    # pruning only
    OMP_NUM_THREADS=1 python benchmarks/mla_prune_quality.py --threads 1 --targets kv_rank_half,q_rank_half \
        --timing-repeats 1 --output benchmarks/results/mla_prune_quality_ranks.json   # the latents' ranks only

The model is the embedded MLA model (`hf_minitron.embedded.latent_attention`: SmolLM2-135M-Instruct converted into a
stock `DeepseekV3ForCausalLM` with every layer dense: 9 MLA heads with 64 position-free + 64 rotary key dims and 64
value dims, a key/value latent and a query latent, SwiGLU 1536). Targets, each by `activation` (the importance pass),
`magnitude` (weight norms) and `random` (mean over seeds):

* `unpruned`: the MLA model itself through the same KD steps, a check of the KD path: its KD gradient is zero, so its
  loss must not move;
* `heads6`: 9 -> 6 MLA heads per layer (queries, `kv_b_proj` rows and `o_proj` columns of the dropped heads);
* `kv_rank_half`: the key/value latent `kv_lora_rank` halved (the per-token cache); the embedded model's latent
  holds the normalised residual stream in the singular basis of the key/value map, whose null space (256 of 576
  channels) carries nothing: the JSON records, per arm and layer, how many of those channels each estimator kept;
* `q_rank_half`: the query latent `q_lora_rank` halved.

The converted model's nine heads come from SmolLM2's three KV groups: heads 3g..3g+2 share their keys and values (the
JSON records, per arm and layer, the kept heads and how many KV groups kept none of theirs).

Every arm is evaluated by held-out loss right after pruning and after `--kd-steps` steps of `DistillationTrainer`
from the unpruned MLA model (same batches, same steps for every arm). One activation importance pass serves every
activation arm; it is timed against plain forward passes of the base model on the same batches (interleaved repeats,
min), the target being <= 1.10x.

Writes `benchmarks/results/mla_prune_quality.{json,png}` and prints a Markdown table.
"""

import time

from _common import (
    RESULTS,
    arm_arguments,
    held_out_loss,
    load_and_time,
    measure_arm,
    num_parameters,
    parse_arm_arguments,
    plot_arms,
    report_arm,
    timing_rows,
)


KD_DIR = RESULTS / ".mla_kd"
ESTIMATORS = ("activation", "magnitude", "random")
TARGET_NAMES = ("unpruned", "heads6", "kv_rank_half", "q_rank_half")
# The source's heads that share one of SmolLM2's KV heads (the converted model's KV groups).
GROUP_SIZE = 3


def targets(config) -> dict:
    """`{name: PrunedConfig fields}` of the targets for the model's config (the ranks halved)."""
    found = {
        "unpruned": {},
        "heads6": {"num_attention_heads": 6},
        "kv_rank_half": {"kv_lora_rank": config.kv_lora_rank // 2},
    }
    if config.q_lora_rank is not None:
        found["q_rank_half"] = {"q_lora_rank": config.q_lora_rank // 2}
    return found


def _pruned_config(target: dict, estimator: str, seed: int, calibration_samples: int):
    from hf_minitron import PrunedConfig

    method = {} if estimator == "none" else {"importance": estimator}
    return PrunedConfig(**target, **method, seed=seed, calibration_samples=calibration_samples)


def groups_left_without_a_head(kept_heads: dict, num_heads: int) -> dict:
    """Per layer, how many of the source's KV groups (`GROUP_SIZE` consecutive heads) kept none of their heads."""
    groups = num_heads // GROUP_SIZE
    return {layer: groups - len({head // GROUP_SIZE for head in heads}) for layer, heads in kept_heads.items()}


def null_channels_kept(teacher, kept_channels: dict) -> dict:
    """Per layer, how many kept key/value latent channels the teacher's `kv_b_proj` does not read (a column norm
    under 1e-5 of the layer's largest): the embedded model's latent keeps the map's null space to hold its RMS at 1,
    so these channels carry nothing but their share of the RMS."""
    counts = {}
    for layer, kept in kept_channels.items():
        norms = teacher.model.layers[layer].self_attn.kv_b_proj.weight.float().norm(dim=0)
        counts[layer] = int((norms[kept] < 1e-5 * norms.max()).sum())
    return counts


def render_markdown(results: dict) -> str:
    setup = results["setup"]
    build = setup["build"]
    lines = [
        f"Embedded MLA (SmolLM2-135M as DeepSeek-V3 MLA: kv_lora_rank {setup['kv_lora_rank']}, q_lora_rank "
        f"{setup['q_lora_rank']}; {setup['parameters']:,} parameters): held-out loss {results['mla_loss']:.3f} here "
        f"(SmolLM2 {build['teacher_loss']:.3f}, MLA {build['mla_loss']:.3f}, MLA without the fit "
        f"{build['unfitted_loss']:.3f} at the build's 256 tokens).",
        "",
        f"| target | estimator | parameters | loss after pruning | loss after {setup['kd_steps']} KD steps |",
        "|---|---|---|---|---|",
    ]
    for name, arm in results["arms"].items():
        target, estimator = name.split("/")
        if estimator == "random" and len(arm["pruned_all"]) > 1:
            estimator += f" (mean of {len(arm['pruned_all'])} seeds)"
        if "groups_left_without_a_head" in arm:
            emptied = sum(arm["groups_left_without_a_head"].values())
            estimator += f" ({emptied} of {len(arm['groups_left_without_a_head']) * 3} KV groups emptied)"
        if "null_channels_kept" in arm:
            estimator += f" ({sum(arm['null_channels_kept'].values())} null-space channels kept)"
        after = "-" if arm.get("after_kd") is None else f"{arm['after_kd']:.3f}"
        lines.append(f"| {target} | {estimator} | {arm['parameters']:,} | {arm['pruned']:.3f} | {after} |")
    lines += timing_rows(results["timing"])
    return "\n".join(lines)


def main():
    parser = arm_arguments(
        __doc__,
        "mla_prune_quality.json",
        TARGET_NAMES,
        calibration_samples=32,
        validation_samples=16,
        timing_repeats=3,
    )
    args = parse_arm_arguments(parser, TARGET_NAMES)
    started = time.perf_counter()

    from hf_minitron.embedded.latent_attention import embedded_mla_info, load_embedded_mla
    from hf_minitron.io import atomic_write_json

    teacher, info, calibration, train, validation, timing, scores = load_and_time(
        load_embedded_mla, embedded_mla_info, args, lambda n: _pruned_config({}, "activation", 0, n)
    )
    available = targets(teacher.config)

    results = {
        "setup": {
            **vars(args),
            "parameters": num_parameters(teacher),
            "kv_lora_rank": teacher.config.kv_lora_rank,
            "q_lora_rank": teacher.config.q_lora_rank,
            "build": {k: v for k, v in info.items() if k != "layers"},
        },
        "mla_loss": held_out_loss(teacher, validation),
        "timing": timing,
        "arms": {},
    }
    for target_name in args.targets.split(","):
        if target_name not in available:
            print(f"{target_name}: not a target of this model (no query latent)", flush=True)
            continue
        for estimator in ("none",) if target_name == "unpruned" else ESTIMATORS:
            seeds = range(args.random_seeds) if estimator == "random" else [0]
            configs = [_pruned_config(available[target_name], estimator, s, len(calibration)) for s in seeds]
            configs = [(c, scores if estimator == "activation" else None) for c in configs]
            arm, _, records = measure_arm(
                teacher, configs, calibration, validation, train, args.kd_steps, args.kd_batch_size, KD_DIR
            )
            if target_name == "heads6":
                kept = dict(records[0].heads)
                arm["kept_heads"] = kept
                arm["groups_left_without_a_head"] = groups_left_without_a_head(
                    kept, teacher.config.num_attention_heads
                )
            if target_name == "kv_rank_half":
                arm["null_channels_kept"] = null_channels_kept(teacher, dict(records[0].kv_latent))
            report_arm(results, target_name, estimator, arm)
    results["wall_seconds"] = time.perf_counter() - started

    atomic_write_json(args.output, results, indent=1)
    plot_arms(
        results, TARGET_NAMES, results["mla_loss"], "unpruned MLA", args.output.replace(".json", ".png"), columns=4
    )
    print(render_markdown(results))


if __name__ == "__main__":
    main()
