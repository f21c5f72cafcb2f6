"""The Minitron papers' claims, reproduced at small scale on SmolLM2-135M and the offline corpus (issue 5, section 2).

    python benchmarks/claims.py                      # every claim; 42 min on a quiet 2-core CPU
    python benchmarks/claims.py --claims a,b         # a subset (finished claims are read from the cache)
    python benchmarks/claims.py --scale 0.1          # a quick end-to-end check (minutes)
    python benchmarks/claims.py --scale 20 --fresh   # a GPU run: 20x the steps, calibration and validation data

Papers: Compact Language Models via Pruning and Knowledge Distillation (https://arxiv.org/abs/2407.14679, "paper 1")
and LLM Pruning and Distillation in Practice: The Minitron Approach (https://arxiv.org/abs/2408.11796, "paper 2").

Claims (each compared on the same held-out split of the embedded corpus, the mean next-token cross-entropy):
a. post-prune loss, no retraining: activation importance vs weight magnitude vs random, width and depth (paper 1 §4);
b. aggregation: batch {l2, mean} x sequence {mean, l2}, width target, no retraining (paper 1 Table 11);
c. equal-token retraining: pruned+KD vs pruned+CE vs random-init same architecture+CE (paper 1's central claim);
d. width vs depth at equal parameters, before and after KD retraining (paper 1 Table 13, paper 2);
e. depth: the contiguous block vs individually Block-Influence-ranked layers, before and after KD (paper 2);
f. teacher correction on vs off: each teacher is pruned and distils its own student (paper 2 §2);
g. logits-only KD vs logits+CE vs logits+intermediate states (paper 1 Tables 15 and 18);
h. residual head merge off vs on the query rows (the paper's) vs on the o_proj columns (paper 1 §2.3);
i. the architecture search's pick vs the hand-chosen width architecture at the same budget (paper 1 §3).

Every retraining arm uses the same learning rate, schedule, steps, batch, sequence length, seed and data order, so
every arm sees the same tokens. Arms shared between claims (e.g. the width student distilled with logit-only KD is
the "KD" arm of c, the "width" arm of d, the "off" arm of f and h, the "logits" arm of g) are trained once.
Finished claims and arms are cached under benchmarks/results/claims_cache/ (keyed by the budget), so a rerun or a
crash recomputes nothing that finished; `--fresh` ignores the cache. Arms and search candidates distilled from the
default teacher read one exact cache of its outputs (`hf_minitron.cache_teacher`, issue 15), written once, instead of
running the teacher at every step; `--live-teacher` runs it in every arm as before.

Writes benchmarks/results/claims.{json,md,png} and prints the table.
"""

import argparse
import copy
import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch


sys.path.insert(0, str(Path(__file__).parent))
from _common import RESULTS, as_tensors, held_out_loss, load_teacher_and_corpus, num_parameters  # noqa: E402


CACHE = RESULTS / "claims_cache"
CLAIMS = "abcdefghi"
# Width and depth targets of (almost) the same size: 84.4M and 85.0M parameters, 63% of the teacher's 134.5M.
WIDTH = dict(hidden_size=480, intermediate_size=1024, num_attention_heads=6)
DEPTH = dict(num_hidden_layers=16)
HEADS_ONLY = dict(num_attention_heads=6)
# The loss terms of the retraining arms; everything else in their `retraining_config` is the same.
# Intermediate states: every 10th layer plus the last (the width student keeps all 30 layers: identity mapping).
LOSSES = {
    "kd": {},
    "ce": dict(kd_loss_weight=0.0, ce_loss_weight=1.0),
    "kd+ce": dict(kd_loss_weight=1.0, ce_loss_weight=1.0),
    "kd+is": dict(intermediate_layer_mapping={9: 9, 19: 19, 29: 29}),
}


@dataclass(frozen=True)
class Budget:
    """Sizes of one run. Every retraining arm trains `steps * batch_size * seq_length` tokens."""

    steps: int = 30
    batch_size: int = 4
    seq_length: int = 128
    learning_rate: float = 1e-4
    calibration_samples: int = 64
    depth_samples: int = 8
    validation_samples: int = 32
    eval_points: int = 5
    random_seeds: int = 2
    search_candidates: int = 3

    @property
    def tokens(self) -> int:
        return self.steps * self.batch_size * self.seq_length

    @property
    def eval_steps(self) -> list[int]:
        return sorted({max(1, round(self.steps * k / self.eval_points)) for k in range(1, self.eval_points + 1)})

    @classmethod
    def scaled(cls, scale: float, **overrides) -> "Budget":
        """`scale` multiplies the steps, calibration, depth-scoring and validation samples (for GPU runs or quick
        checks); explicit `overrides` win."""
        if not scale > 0:
            raise ValueError(f"--scale={scale!r} is invalid: use a positive multiplier (1 is the default run).")
        base = cls()
        values = dict(
            steps=max(2, round(base.steps * scale)),
            calibration_samples=max(8, round(base.calibration_samples * scale)),
            depth_samples=max(2, round(base.depth_samples * scale)),
            validation_samples=max(4, round(base.validation_samples * scale)),
        )
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def retraining_config(budget: "Budget", output_dir: str, **loss):
    """The `DistillationConfig` of every retraining arm: only the loss terms (`loss`) differ between arms."""
    from hf_minitron import DistillationConfig

    return DistillationConfig(
        output_dir=output_dir,
        report_to="none",
        use_cpu=not torch.cuda.is_available(),
        max_steps=budget.steps,
        per_device_train_batch_size=budget.batch_size,
        learning_rate=budget.learning_rate,
        # Constant, as in the search's retraining (claim i compares against it): the loss at step k is that of k
        # steps whatever the total.
        lr_scheduler_type="constant",
        save_strategy="no",
        disable_tqdm=True,
        logging_steps=max(1, budget.steps // budget.eval_points),
        seed=0,
        data_seed=0,
        **loss,
    )


# ---------------------------------------------------------------------------------------------- shared state
class Bench:
    """One teacher in memory, the data splits, importance scores computed once per (teacher, aggregation), and the
    retraining arms (memoised in memory and on disk)."""

    def __init__(self, budget: Budget, fresh: bool, offline_teacher: bool = True):
        self.budget, self.fresh, self.offline_teacher = budget, fresh, offline_teacher
        needed = budget.steps * budget.batch_size
        self.teacher, self.tokenizer, data = load_teacher_and_corpus(budget.seq_length)
        if len(data["train"]) < max(needed, budget.calibration_samples):
            raise ValueError(
                f"The embedded corpus packs {len(data['train'])} training samples of {budget.seq_length} tokens, fewer "
                f"than steps * batch_size = {needed}: lower --steps, --batch-size or --scale."
            )
        self.train = data["train"].select(range(needed))
        self.calibration = data["train"].select(range(budget.calibration_samples))
        n_val = min(budget.validation_samples, len(data["validation"]))
        self.validation_dataset = data["validation"].select(range(n_val))
        self.validation = as_tensors(self.validation_dataset)
        self._scores = {}
        self._arms = {}
        self._corrected = None
        self._teacher_cache = None
        self.teacher_loss = held_out_loss(self.teacher, self.validation)

    # -------------------------------------------------------------------------------------- pruning
    def scores(self, teacher=None, sequence_aggregation: str = "mean"):
        from hf_minitron import estimate_importance

        teacher = teacher if teacher is not None else self.teacher
        key = (id(teacher), sequence_aggregation)
        if key not in self._scores:
            config = self.pruned_config(sequence_aggregation=sequence_aggregation)
            self._scores[key] = estimate_importance(teacher, self.calibration, config, show_progress=False)
        return self._scores[key]

    def pruned_config(self, **fields):
        from hf_minitron import PrunedConfig

        return PrunedConfig(
            calibration_samples=self.budget.calibration_samples,
            depth_calibration_samples=self.budget.depth_samples,
            **fields,
        )

    def prune(self, target: dict, teacher=None, scores=None, **options):
        """A pruned copy of `teacher` (the shared one by default); activation importance reuses the cached pass."""
        from hf_minitron import prune_model

        teacher = teacher if teacher is not None else self.teacher
        config = self.pruned_config(**target, **options)
        if scores is None and config.importance == "activation":
            scores = self.scores(teacher, config.sequence_aggregation)
        pruned = prune_model(copy.deepcopy(teacher), config, self.calibration, scores=scores, show_progress=False)
        return pruned.requires_grad_(True)  # a copy of a teacher that a trainer has frozen

    def random_init(self, target: dict):
        """The pruned architecture with freshly initialised weights (the from-scratch baseline of claim c)."""
        from transformers import AutoModelForCausalLM

        shape_donor = self.prune(target)
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(copy.deepcopy(shape_donor.config))

    def post_prune(self, model) -> dict:
        """Held-out loss of a pruned model, no retraining."""
        record = getattr(model, "pruning_record", None)
        return {
            "before": held_out_loss(model, self.validation),
            "parameters": num_parameters(model),
            "dropped_layers": record.dropped_layers if record is not None else [],
        }

    # -------------------------------------------------------------------------------------- retraining
    def teacher_cache(self):
        """One exact (hidden-state) cache of the default teacher over the training split (issue 15), written once
        under the claims cache: every arm distilled from that teacher reads it instead of running the teacher."""
        if self._teacher_cache is None:
            from hf_minitron import cache_teacher

            self._teacher_cache = cache_teacher(
                self.teacher, self.train, CACHE / "teacher_cache", tokenizer=self.tokenizer, overwrite=True,
                show_progress=False,
            )  # fmt: skip
        return self._teacher_cache

    def arm(self, name: str, make_student, teacher=None, **loss) -> dict:
        """Retrains `make_student()` for the budget's steps with `DistillationTrainer` (loss weights in `loss`) and
        records the held-out loss at step 0 and at `budget.eval_steps`."""
        if name in self._arms:
            return self._arms[name]
        path = CACHE / "arms" / (name.replace("/", "__") + ".json")
        cached = _read_cache(path, self.budget) if not self.fresh else None
        if cached is not None:
            self._arms[name] = cached
            return cached
        from transformers import TrainerCallback

        from hf_minitron import DistillationTrainer

        started = time.time()
        student = make_student()
        record = getattr(student, "pruning_record", None)
        curve = [[0, held_out_loss(student, self.validation)]]
        eval_steps, validation = set(self.budget.eval_steps), self.validation

        class HeldOutCurve(TrainerCallback):
            def on_step_end(self, args, state, control, model=None, **kwargs):
                if state.global_step in eval_steps:
                    curve.append([state.global_step, held_out_loss(model, validation)])

        output_dir = str(CACHE / "tmp" / name.replace("/", "__"))
        # Arms distilled from the default teacher share one cache of its outputs (the intermediate-state loss needs
        # the live teacher's layers; the corrected teacher of claim f is another teacher).
        offline = self.offline_teacher and teacher is None and not loss.get("intermediate_layer_mapping")
        trainer = DistillationTrainer(
            model=student,
            teacher_model=None if offline else (teacher if teacher is not None else self.teacher),
            args=retraining_config(self.budget, output_dir, **loss),
            train_dataset=self.teacher_cache() if offline else self.train,
            processing_class=self.tokenizer,
            callbacks=[HeldOutCurve()],
        )
        trainer.train()
        shutil.rmtree(output_dir, ignore_errors=True)
        result = {
            "before": curve[0][1],
            "after": curve[-1][1],
            "curve": curve,
            "parameters": num_parameters(student) - _projection_parameters(student),
            "tokens": trainer.state.global_step * self.budget.batch_size * self.budget.seq_length,
            "steps": trainer.state.global_step,
            "dropped_layers": record.dropped_layers if record is not None else [],
            "loss_weights": {k: v for k, v in loss.items()},
            "seconds": time.time() - started,
        }
        _write_cache(path, self.budget, result)
        self._arms[name] = result
        return result

    # -------------------------------------------------------------------------------------- teacher correction
    def corrected_teacher(self):
        """The teacher fine-tuned on the training split for the same steps/batch/LR as the students (paper 2 §2),
        saved once under the cache."""
        if self._corrected is not None:
            return self._corrected
        from transformers import AutoModelForCausalLM

        from hf_minitron.teacher_correction import TeacherCorrectionConfig, correct_teacher

        directory = CACHE / "corrected_teacher"
        marker = CACHE / "corrected_teacher.json"
        if not self.fresh and _read_cache(marker, self.budget) is not None and directory.is_dir():
            model = AutoModelForCausalLM.from_pretrained(directory, use_safetensors=True)
        else:
            b = self.budget
            model = copy.deepcopy(self.teacher).requires_grad_(True)  # the trainers froze the shared teacher
            args = TeacherCorrectionConfig(
                output_dir=str(CACHE / "tmp" / "correction"),
                corrected_model_dir=str(directory),
                report_to="none",
                use_cpu=not torch.cuda.is_available(),
                max_steps=b.steps,
                per_device_train_batch_size=b.batch_size,
                learning_rate=b.learning_rate,
                lr_scheduler_type="constant",
                save_strategy="no",
                disable_tqdm=True,
                seed=0,
                data_seed=0,
            )
            model = correct_teacher(model, args, self.train, processing_class=self.tokenizer)
            shutil.rmtree(args.output_dir, ignore_errors=True)
            _write_cache(marker, self.budget, {"directory": str(directory)})
        self._corrected = model.eval().requires_grad_(False)
        return self._corrected


def _projection_parameters(model) -> int:
    # The intermediate-state loss adds a learned projection to the student; it is not part of the student model.
    projection = getattr(model, "minitron_projection", None)
    return 0 if projection is None else num_parameters(projection)


def _read_cache(path: Path, budget: Budget):
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    return data["result"] if data.get("budget") == asdict(budget) else None


def _write_cache(path: Path, budget: Budget, result) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"budget": asdict(budget), "result": result}, indent=2))
    os.replace(tmp, path)  # a crash never leaves a half-written cache entry


def _fmt(x: float) -> str:
    return f"{x:.3f}"


# ---------------------------------------------------------------------------------------------- the claims
def claim_a(bench: Bench) -> dict:
    arms = {}
    for target_name, target in (("width", WIDTH), ("depth", DEPTH)):
        for method in ("activation", "magnitude", "random"):
            seeds = range(bench.budget.random_seeds) if method == "random" else [0]
            runs = [bench.post_prune(bench.prune(target, importance=method, seed=seed)) for seed in seeds]
            arms[f"{target_name}/{method}"] = {
                **runs[0],
                "before": sum(r["before"] for r in runs) / len(runs),
                "all": [r["before"] for r in runs],
            }
    held = all(
        arms[f"{t}/activation"]["before"] < min(arms[f"{t}/magnitude"]["before"], arms[f"{t}/random"]["before"])
        for t in ("width", "depth")
    )
    parts = [
        f"{t}: activation {_fmt(arms[f'{t}/activation']['before'])}, magnitude {_fmt(arms[f'{t}/magnitude']['before'])}, "
        f"random {_fmt(arms[f'{t}/random']['before'])}"
        for t in ("width", "depth")
    ]
    return {
        "title": "Post-prune loss (no retraining): activation vs magnitude vs random importance",
        "expected": "activation importance gives the lowest loss for both width and depth pruning (paper 1)",
        "arms": arms,
        "held": held,
        "numbers": "; ".join(parts),
    }


def claim_b(bench: Bench) -> dict:
    arms = {}
    for sequence in ("mean", "l2"):
        scores = bench.scores(sequence_aggregation=sequence)
        for batch in ("l2", "mean"):
            model = bench.prune(WIDTH, scores=scores, sequence_aggregation=sequence, batch_aggregation=batch)
            arms[f"width/seq_{sequence}+batch_{batch}"] = bench.post_prune(model)
    best = min(arms, key=lambda k: arms[k]["before"])
    return {
        "title": "Importance aggregation: sequence {mean, l2} x batch {l2, mean} (width target, no retraining)",
        "expected": "sequence mean + batch L2 is the best of the four (paper 1 Table 11)",
        "arms": arms,
        "held": best == "width/seq_mean+batch_l2",
        "numbers": ", ".join(f"{k.split('/')[1]} {_fmt(v['before'])}" for k, v in arms.items()) + f"; best: {best}",
    }


def _width_kd(bench: Bench) -> dict:
    return bench.arm("width/kd", lambda: bench.prune(WIDTH))


def claim_c(bench: Bench) -> dict:
    arms = {
        "width/pruned+kd": _width_kd(bench),
        "width/pruned+ce": bench.arm("width/ce", lambda: bench.prune(WIDTH), **LOSSES["ce"]),
        "width/random_init+ce": bench.arm("width/random_init/ce", lambda: bench.random_init(WIDTH), **LOSSES["ce"]),
    }
    kd, ce, scratch = (arms[k]["after"] for k in arms)
    return {
        "title": "Equal-token retraining: pruned+KD vs pruned+CE vs random init+CE (same architecture)",
        "expected": "pruned+KD has the lowest loss: pruning+distillation beats training from scratch and plain CE",
        "arms": arms,
        "held": kd < ce and kd < scratch,
        "numbers": f"after {bench.budget.steps} steps: pruned+KD {_fmt(kd)}, pruned+CE {_fmt(ce)}, "
        f"random init+CE {_fmt(scratch)}",
    }


def _depth_kd(bench: Bench, method: str) -> dict:
    return bench.arm(f"depth/{method}/kd", lambda: bench.prune(DEPTH, depth_method=method))


def claim_d(bench: Bench) -> dict:
    arms = {"width": _width_kd(bench), "depth (contiguous)": _depth_kd(bench, "contiguous")}
    w, d = arms["width"], arms["depth (contiguous)"]
    return {
        "title": "Width vs depth pruning at equal parameters (84.4M vs 85.0M), KD retraining",
        "expected": "width pruning has the lower loss after retraining (paper 1 Table 13, paper 2)",
        "arms": arms,
        "held": w["after"] < d["after"],
        "numbers": f"before retraining: width {_fmt(w['before'])}, depth {_fmt(d['before'])}; after "
        f"{bench.budget.steps} KD steps: width {_fmt(w['after'])}, depth {_fmt(d['after'])}",
    }


def claim_e(bench: Bench) -> dict:
    arms = {
        "depth/contiguous": _depth_kd(bench, "contiguous"),
        "depth/block_influence": _depth_kd(bench, "block_influence"),
    }
    c, bi = arms["depth/contiguous"], arms["depth/block_influence"]
    return {
        "title": "Depth: contiguous block vs individually Block-Influence-ranked layers (14 of 30 dropped), KD",
        "expected": "the contiguous block has the lower loss after retraining (paper 2)",
        "arms": arms,
        "held": c["after"] < bi["after"],
        "numbers": f"before: contiguous {_fmt(c['before'])}, BI {_fmt(bi['before'])}; after {bench.budget.steps} KD "
        f"steps: contiguous {_fmt(c['after'])}, BI {_fmt(bi['after'])}",
    }


def claim_f(bench: Bench) -> dict:
    corrected = bench.corrected_teacher()
    corrected_loss = held_out_loss(corrected, bench.validation)
    on = bench.arm(
        "width/kd/corrected_teacher",
        lambda: bench.prune(WIDTH, teacher=corrected, scores=bench.scores(corrected)),
        teacher=corrected,
    )
    off = _width_kd(bench)
    return {
        "title": "Teacher correction on vs off (each teacher pruned to the width target, distils its own student)",
        "expected": "the student of the corrected teacher has the lower loss on the new data (paper 2 §2)",
        "arms": {"correction off": off, "correction on": on},
        "teacher_loss": {"original": bench.teacher_loss, "corrected": corrected_loss},
        "held": on["after"] < off["after"],
        "numbers": f"teacher {_fmt(bench.teacher_loss)} -> corrected {_fmt(corrected_loss)}; student after "
        f"{bench.budget.steps} KD steps: off {_fmt(off['after'])}, on {_fmt(on['after'])}",
    }


def claim_g(bench: Bench) -> dict:
    arms = {
        "logits": _width_kd(bench),
        "logits+ce": bench.arm("width/kd+ce", lambda: bench.prune(WIDTH), **LOSSES["kd+ce"]),
        "logits+intermediate": bench.arm("width/kd+is", lambda: bench.prune(WIDTH), **copy.deepcopy(LOSSES["kd+is"])),
    }
    lo, lce, lis = (arms[k]["after"] for k in arms)
    return {
        "title": "KD loss: logits only vs logits+CE vs logits+intermediate states (width student)",
        "expected": "logits-only is at least as good as either addition for a width-pruned student (paper 1)",
        "arms": arms,
        "held": lo <= min(lce, lis),
        "numbers": f"after {bench.budget.steps} steps: logits {_fmt(lo)}, logits+CE {_fmt(lce)}, "
        f"logits+intermediate {_fmt(lis)}",
    }


def claim_h(bench: Bench) -> dict:
    # Two variants (PrunedConfig.head_merge): "query" merges the heads' own query rows, as paper 1 §2.3 describes for
    # grouped-query attention (SmolLM2: 9 query heads in 3 KV groups); "o_proj" merges their o_proj columns.
    arms = {
        "width/merge off": _width_kd(bench),
        "width/merge query": bench.arm("width/head_merge_query/kd", lambda: bench.prune(WIDTH, head_merge="query")),
        # The arm name of the o_proj variant is the one `head_merge=True` had (what `true` still means): cached arms
        # stay valid.
        "width/merge o_proj": bench.arm("width/head_merge/kd", lambda: bench.prune(WIDTH, head_merge="o_proj")),
        "heads_only/merge off": bench.post_prune(bench.prune(HEADS_ONLY)),
        "heads_only/merge query": bench.post_prune(bench.prune(HEADS_ONLY, head_merge="query")),
        "heads_only/merge o_proj": bench.post_prune(bench.prune(HEADS_ONLY, head_merge="o_proj")),
    }
    off, query, o_proj = (arms[f"width/merge {k}"] for k in ("off", "query", "o_proj"))
    heads_only = {k: arms[f"heads_only/merge {k}"]["before"] for k in ("off", "query", "o_proj")}
    return {
        "title": "Residual head merge: off vs query rows (the paper's) vs o_proj columns",
        "expected": "merging the pruned heads into the kept ones (query rows) lowers the loss (paper 1 §2.3)",
        "arms": arms,
        "held": query["after"] < off["after"] and query["before"] < off["before"],
        "numbers": f"width before: off {_fmt(off['before'])}, query {_fmt(query['before'])}, o_proj "
        f"{_fmt(o_proj['before'])}; width after {bench.budget.steps} KD steps: off {_fmt(off['after'])}, query "
        f"{_fmt(query['after'])}, o_proj {_fmt(o_proj['after'])}; heads only (9 -> 6) before: off "
        f"{_fmt(heads_only['off'])}, query {_fmt(heads_only['query'])}, o_proj {_fmt(heads_only['o_proj'])}",
    }


def search_ready() -> str | None:
    """Why claim i cannot run, or None: it needs `hf_minitron/search.py` committed with its tests."""
    root = Path(__file__).resolve().parent.parent
    for path in ("hf_minitron/search.py", "tests/test_search.py"):
        tracked = subprocess.run(["git", "ls-files", "--error-unmatch", path], cwd=root, capture_output=True)
        if tracked.returncode != 0:
            return f"{path} is not committed yet"
    return None


def claim_i(bench: Bench) -> dict:
    from hf_minitron.parameter_count import count_parameters
    from hf_minitron.search import SearchConfig, search_architectures

    b = bench.budget
    target = count_parameters(bench.teacher.config, bench.pruned_config(**WIDTH))
    config = SearchConfig(
        target_params=target,
        tolerance=0.05,
        max_depth_pruning=0.5,
        max_candidates=b.search_candidates,
        retrain_steps=b.steps,
        eval_interval=max(1, b.steps // b.eval_points),
        pruning={"calibration_samples": b.calibration_samples, "depth_calibration_samples": b.depth_samples},
    )
    # The candidates read the arms' teacher cache (same teacher, same training split); its own folder, since a search
    # output_dir refuses a rerun with other settings.
    teacher_cache = bench.teacher_cache() if bench.offline_teacher else None
    output_dir = CACHE / ("search" if teacher_cache is None else "search_teacher_cache")
    if bench.fresh:
        shutil.rmtree(output_dir, ignore_errors=True)
    result = search_architectures(
        bench.teacher,
        config,
        train_dataset=bench.train,
        eval_dataset=bench.validation_dataset,
        scores=bench.scores(),
        calibration_data=bench.calibration,
        output_dir=output_dir,
        distillation_config=retraining_config(b, str(CACHE / "tmp" / "search")),
        processing_class=bench.tokenizer,
        teacher_cache=teacher_cache,
        show_progress=False,
    )
    hand = _width_kd(bench)
    best = result.best
    best_dict = best.to_dict()
    arms = {"hand-chosen width": hand, f"search pick ({best_dict['name']})": _search_arm(best_dict)}
    ranking = [c.to_dict() for c in result.ranking()]
    pick = next(v for k, v in arms.items() if k.startswith("search"))
    return {
        "title": "Search pick vs hand-chosen width architecture at the same budget (±5%), equal KD steps",
        "expected": "the search's pick is at least as good as the hand-chosen architecture",
        "arms": arms,
        "ranking": ranking,
        "held": pick["after"] <= hand["after"],
        "numbers": f"after {b.steps} KD steps: hand-chosen {_fmt(hand['after'])}, search pick {_fmt(pick['after'])} "
        f"(of {len(ranking)} candidates)",
    }


def _search_arm(candidate: dict) -> dict:
    """The search's record of one candidate (`CandidateResult.to_dict()`) in this script's arm format."""
    curve = sorted([int(step), float(value)] for step, value in candidate["heldout_loss"].items())
    return {
        "before": curve[0][1],
        "after": curve[-1][1],
        "curve": curve,
        "parameters": candidate["parameters"]["total"],
        "shape": candidate["shape"],
        "seconds": candidate.get("seconds"),
    }


CLAIM_FUNCTIONS = dict(zip(CLAIMS, (claim_a, claim_b, claim_c, claim_d, claim_e, claim_f, claim_g, claim_h, claim_i)))


# ---------------------------------------------------------------------------------------------- report
def sentence(letter: str, claim: dict) -> str:
    if claim.get("status") == "not run":
        return f"**{letter}. {claim['title']}** — not run: {claim['reason']}."
    verdict = "held here" if claim["held"] else "did NOT hold here"
    return f"**{letter}. {claim['title']}** — {verdict} (expected: {claim['expected']}): {claim['numbers']}."


def render_markdown(results: dict) -> str:
    b, setup = results["budget"], results["setup"]
    lines = [
        f"Command: `{results.get('command', 'python benchmarks/claims.py')}`.",
        "",
        f"Teacher: SmolLM2-135M ({setup['teacher_parameters']:,} parameters), held-out loss "
        f"{_fmt(setup['teacher_loss'])} on {setup['validation_samples']} validation samples of {b['seq_length']} "
        f"tokens of the embedded corpus. Retraining arms: {b['steps']} steps x batch {b['batch_size']} x "
        f"{b['seq_length']} tokens = {b['steps'] * b['batch_size'] * b['seq_length']:,} tokens each, AdamW at a "
        f"constant LR {b['learning_rate']}, seed 0, the same batches in the same order. Calibration: "
        f"{b['calibration_samples']} samples ({b['depth_samples']} for depth scoring).",
        "",
        "| claim | arm | parameters | loss after pruning | loss after retraining | held here |",
        "|---|---|---|---|---|---|",
    ]
    for letter, claim in results["claims"].items():
        if claim.get("status") == "not run":
            lines.append(f"| {letter} | not run | - | - | - | - |")
            continue
        for i, (name, arm) in enumerate(claim["arms"].items()):
            after = _fmt(arm["after"]) if "after" in arm else "-"
            params = f"{arm['parameters']:,}" if arm.get("parameters") else "-"
            held = ("yes" if claim["held"] else "**no**") if i == 0 else ""
            lines.append(f"| {letter} | {name} | {params} | {_fmt(arm['before'])} | {after} | {held} |")
    lines += [
        "",
        f'One seed and {setup["validation_samples"]} validation samples: "held" compares the numbers as measured, '
        "so gaps of a few hundredths of a nat are within run-to-run noise; read the verdicts with their margins.",
        "",
        *[sentence(k, v) + "\n" for k, v in results["claims"].items()],
    ]
    lines += [
        "| claim | wall time (s) | load average (1 min) at start / end |",
        "|---|---|---|",
    ]
    for letter, claim in results["claims"].items():
        if "wall_seconds" in claim:
            load = claim.get("load_average", [None, None])
            lines.append(f"| {letter} | {claim['wall_seconds']:.0f} | {load[0]:.2f} / {load[1]:.2f} |")
    loads = [x for c in results["claims"].values() for x in c.get("load_average", [])]
    if loads:
        lines.append(
            f"\nMachine load while the claims ran: 1-minute load average {min(loads):.1f} to {max(loads):.1f} on "
            f"{os.cpu_count()} cores (other jobs shared the CPU, so the wall times are pessimistic)."
        )
    lines.append(
        f"\nTotal wall time of the claims {results['wall_seconds_all_claims']:.0f} s on {setup['machine']}. Arms shared between claims "
        "are trained once: a claim's wall time excludes arms an earlier claim had already trained."
    )
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    claims = results["claims"]
    cols = 3
    rows = math.ceil(len(claims) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 3.8 * rows), squeeze=False)
    teacher_loss = results["setup"]["teacher_loss"]
    for ax, (letter, claim) in zip(axes.flat, claims.items()):
        if claim.get("status") == "not run":
            ax.text(0.5, 0.5, f"{letter}: not run\n{claim['reason']}", ha="center", va="center", wrap=True)
            ax.axis("off")
            continue
        curves = {k: v["curve"] for k, v in claim["arms"].items() if v.get("curve")}
        if curves:
            for name, curve in curves.items():
                ax.plot([s for s, _ in curve], [v for _, v in curve], marker="o", label=name)
            ax.set_xlabel("retraining step")
        else:
            names = list(claim["arms"])
            ax.bar(range(len(names)), [claim["arms"][n]["before"] for n in names], color="tab:blue")
            ax.set_xticks(range(len(names)), [n.replace("/", "\n").replace("+", "+\n") for n in names], fontsize=7)
        ax.axhline(teacher_loss, color="k", ls="--", lw=0.8, label="teacher")
        ax.set_title(f"{letter}. {'held' if claim['held'] else 'did not hold'}", fontsize=10)
        ax.set_ylabel("held-out loss")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(claims) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# ---------------------------------------------------------------------------------------------- driver
def parse_claims(text: str) -> list[str]:
    letters = [c.strip().lower() for c in text.split(",") if c.strip()]
    unknown = [c for c in letters if c not in CLAIMS]
    if unknown or not letters:
        raise SystemExit(f"--claims={text!r}: expected comma-separated letters among {','.join(CLAIMS)}, e.g. a,c,d.")
    return sorted(set(letters), key=CLAIMS.index)


def main(argv=None):
    global CACHE
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--claims", default=",".join(CLAIMS), help="Comma-separated subset, e.g. a,c,d.")
    parser.add_argument("--scale", type=float, default=1.0, help="Multiplies steps, calibration and validation.")
    parser.add_argument("--steps", type=int, help="Retraining steps per arm (overrides --scale).")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--seq-length", type=int)
    parser.add_argument("--learning-rate", type=float)
    parser.add_argument("--fresh", action="store_true", help="Ignore the cache of finished claims and arms.")
    parser.add_argument(
        "--threads", type=int, help="torch intra-op threads (1 is faster on a CPU shared with other jobs)."
    )
    parser.add_argument(
        "--live-teacher", action="store_true", help="Run the teacher in every arm instead of one cache of its outputs."
    )
    parser.add_argument("--output", default=str(RESULTS / "claims.json"))
    parser.add_argument("--cache-dir", default=str(CACHE), help="Where finished claims and arms are cached.")
    args = parser.parse_args(argv)
    letters = parse_claims(args.claims)
    CACHE = Path(args.cache_dir)
    budget = Budget.scaled(
        args.scale,
        steps=args.steps,
        batch_size=args.batch_size,
        seq_length=args.seq_length,
        learning_rate=args.learning_rate,
    )
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    started = time.time()
    bench = None
    claims = {}
    for letter in letters:
        path = CACHE / f"claim_{letter}.json"
        cached = None if args.fresh else _read_cache(path, budget)
        if cached is not None:
            print(f"claim {letter}: cached ({path})", flush=True)
            claims[letter] = cached
            continue
        if letter == "i" and (reason := search_ready()):
            claims[letter] = {
                "status": "not run",
                "title": "Search pick vs hand-chosen architecture",
                "reason": reason,
            }
            print(f"claim i: not run ({reason})", flush=True)
            continue
        if bench is None:
            print("Loading the teacher and the corpus ...", flush=True)
            bench = Bench(budget, args.fresh, offline_teacher=not args.live_teacher)
        print(f"claim {letter}: running ...", flush=True)
        claim_start, load_start = time.time(), os.getloadavg()[0]
        claim = CLAIM_FUNCTIONS[letter](bench)
        claim["wall_seconds"] = time.time() - claim_start
        claim["load_average"] = [load_start, os.getloadavg()[0]]
        _write_cache(path, budget, claim)
        claims[letter] = claim
        print(f"claim {letter}: {'held' if claim['held'] else 'did NOT hold'} ({claim['wall_seconds']:.0f} s) -- "
              f"{claim['numbers']}", flush=True)  # fmt: skip

    if bench is None:  # every claim cached: the setup numbers come from the last full results
        previous = json.loads(Path(args.output).read_text()) if Path(args.output).exists() else {}
        setup = previous.get("setup")
        if setup is None:
            bench = Bench(budget, args.fresh, offline_teacher=not args.live_teacher)
    if bench is not None:
        setup = {
            "teacher": "SmolLM2-135M (embedded GGUF)",
            "teacher_parameters": num_parameters(bench.teacher),
            "teacher_loss": bench.teacher_loss,
            "validation_samples": len(bench.validation),
            "machine": f"{os.cpu_count()} CPU cores"
            + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no GPU")
            + f", {torch.get_num_threads()} torch threads",
        }
    results = {
        "command": " ".join(["python", "benchmarks/claims.py", *(sys.argv[1:] if argv is None else argv)]),
        "scale": args.scale,
        "budget": asdict(budget),
        "tokens_per_arm": budget.tokens,
        "setup": setup,
        "claims": claims,
        "wall_seconds": time.time() - started,
        "wall_seconds_all_claims": sum(c.get("wall_seconds", 0) for c in claims.values()),
    }
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2))
    markdown = render_markdown(results)
    output.with_suffix(".md").write_text("# Minitron claims at small scale\n\n" + markdown + "\n")
    plot(results, output.with_suffix(".png"))
    print(markdown)


if __name__ == "__main__":
    main()
