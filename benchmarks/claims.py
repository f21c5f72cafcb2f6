"""The Minitron papers' claims, reproduced at small scale on SmolLM2-135M and the offline corpus.

    python benchmarks/claims.py                      # every claim, 3 training seeds per arm (~3 h on a 2-core CPU)
    python benchmarks/claims.py --claims a,b         # a subset (finished claims are read from the cache)
    python benchmarks/claims.py --quick              # a smoke run: --scale 0.1 --seeds 2 into a scratch folder
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

The embedded corpus (CPython's reference docs) is text the teacher was never trained on, where paper 2 says KD needs
teacher correction first. Claims c and g are therefore also run where their premise holds, each at the same
tokens and on its own held-out split: the standard library's source (in-distribution code for SmolLM2), text sampled
from the teacher itself (temperature 1 from 8-token prompts of the corpus; cached on disk), and the embedded corpus
after teacher correction (the teacher is corrected, pruned, and distils its own student: the paper-2 recipe). Each
data's student is pruned with calibration samples of that data, as the papers calibrate on the distillation data.

Every retraining arm uses the same learning rate, schedule, steps, batch, sequence length and training data, so every
arm sees the same tokens, and runs once per training seed (`--seeds`, default 3): the seed sets the batch order, the
trainer's RNG and the intermediate-state projection's initialisation; the pruned student (and the random-init
baseline) are the same in every seed, and seed 0 is the single run of earlier versions. A comparison is decided only
when the gap between the arms' means exceeds the larger of their ranges (max - min over seeds); otherwise it is
"within noise". Arms shared between claims (e.g. the width student distilled with logit-only KD is the "KD" arm of
c, the "width" arm of d, the "off" arm of f and h, the "logits" arm of g) are trained once.

Finished claims and arms (per seed) are cached under benchmarks/results/claims_cache/ (keyed by the budget and the
seed or seeds), so a rerun or a crash recomputes nothing that finished; `--fresh` ignores the cache. Arms distil from
one exact cache of their teacher's outputs over their training split (`hf_minitron.cache_teacher`), written
once per teacher and data, instead of running the teacher at every step; `--live-teacher` runs it in every arm.

Writes benchmarks/results/claims.{json,md,png} and prints the table.
"""

import argparse
import copy
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch


sys.path.insert(0, str(Path(__file__).parent))
from _common import RESULTS, as_tensors, held_out_loss, load_teacher_and_corpus, num_parameters  # noqa: E402

from hf_minitron.io import atomic_write_json, atomic_write_text


CACHE = RESULTS / "claims_cache"
QUICK = RESULTS / ".claims_quick"  # a scratch folder (ignored by git): a smoke run never overwrites the results
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
# The data (and teacher) of the arms of claims c and g. "embedded" is the setting of every other claim; the others are
# where the claims' premise holds: data the teacher models well, or a teacher corrected on the data.
DOMAINS = {
    "embedded": "pydoc topics",
    "stdlib": "stdlib source",
    "sampled": "teacher samples",
    "corrected": "pydoc topics, corrected teacher",
}
DOMAIN_NOTES = {
    "embedded": "CPython's reference docs (the embedded corpus), text the teacher was never trained on",
    "stdlib": "the standard library's own source (`hf_minitron.data`, `stdlib`): code, in distribution for SmolLM2",
    "sampled": "sequences sampled from the teacher itself at temperature 1 from 8-token prompts of the embedded "
    "corpus (training prompts from its training split, held-out prompts from its validation split)",
    "corrected": "the embedded corpus, but the teacher is first corrected on the training split (paper 2 §2), then "
    "pruned, and distils its own student; the CE arms start from that same pruned student, and random init+CE is the "
    "pydoc-topics arm (same data; random weights owe nothing to the teacher)",
}
# Teacher samples: prompts short enough that almost every token is the teacher's own; pure ancestral sampling
# (temperature 1, no top-k/top-p), so the text follows the teacher's distribution exactly.
PROMPT_TOKENS = 8
SAMPLING_TEMPERATURE = 1.0
SAMPLING_BATCH = 16


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


def retraining_config(budget: "Budget", output_dir: str, seed: int = 0, **loss):
    """The `DistillationConfig` of every retraining arm: only the loss terms (`loss`) and the seed differ."""
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
        # The sampler shuffles with data_seed: one epoch of the same samples in another order per seed.
        seed=seed,
        data_seed=seed,
        **loss,
    )


@dataclass
class Domain:
    """The data and the teacher of a group of retraining arms, which differ only in their loss.

    Attributes:
        name (`str`): a key of `DOMAINS`.
        train (`datasets.Dataset`): `steps * batch_size` packed samples, every arm's training tokens.
        calibration (`datasets.Dataset`): the pruning's calibration samples, from the same data (as in the papers).
        validation (`list[dict]`): the held-out samples every arm of the domain is evaluated on.
        teacher (`PreTrainedModel`): the teacher distilled from, whose pruned copy is the student.
        teacher_loss (`float`): its held-out loss on `validation`.
        info (`dict`): how the data was made (e.g. the cost of sampling it).
    """

    name: str
    train: object
    calibration: object
    validation: list
    teacher: object
    teacher_loss: float
    info: dict


# ---------------------------------------------------------------------------------------------- shared state
class Bench:
    """One teacher in memory, the data splits, importance scores computed once per (teacher, aggregation), and the
    retraining arms (memoised in memory and, per seed, on disk)."""

    def __init__(self, budget: Budget, fresh: bool, offline_teacher: bool = True, seeds: int = 3):
        self.budget, self.fresh, self.offline_teacher, self.seeds = budget, fresh, offline_teacher, seeds
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
        self._domains = {}
        self._teacher_caches = {}
        self._corrected = None
        self.teacher_loss = held_out_loss(self.teacher, self.validation)

    # -------------------------------------------------------------------------------------- pruning
    def scores(self, teacher=None, sequence_aggregation: str = "mean", calibration=None):
        from hf_minitron import estimate_importance

        teacher = teacher if teacher is not None else self.teacher
        calibration = calibration if calibration is not None else self.calibration
        # Teachers and calibration sets live as long as the bench: their ids name them.
        key = (id(teacher), id(calibration), sequence_aggregation)
        if key not in self._scores:
            config = self.pruned_config(sequence_aggregation=sequence_aggregation)
            self._scores[key] = estimate_importance(teacher, calibration, config, show_progress=False)
        return self._scores[key]

    def pruned_config(self, **fields):
        from hf_minitron import PrunedConfig

        return PrunedConfig(
            calibration_samples=self.budget.calibration_samples,
            depth_calibration_samples=self.budget.depth_samples,
            **fields,
        )

    def prune(self, target: dict, teacher=None, scores=None, calibration=None, **options):
        """A pruned copy of `teacher` (the shared one by default), calibrated on `calibration` (the embedded corpus's
        by default); activation importance reuses the cached pass."""
        from hf_minitron import prune_model

        teacher = teacher if teacher is not None else self.teacher
        calibration = calibration if calibration is not None else self.calibration
        config = self.pruned_config(**target, **options)
        if scores is None and config.importance == "activation":
            scores = self.scores(teacher, config.sequence_aggregation, calibration)
        pruned = prune_model(copy.deepcopy(teacher), config, calibration, scores=scores, show_progress=False)
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

    # -------------------------------------------------------------------------------------- data and teachers
    def domain(self, name: str) -> Domain:
        """The training split, held-out split and teacher of one of `DOMAINS`, built once."""
        if name in self._domains:
            return self._domains[name]
        info = {}
        if name in ("embedded", "corrected"):
            train, calibration, validation = self.train, self.calibration, self.validation
            teacher = self.teacher if name == "embedded" else self.corrected_teacher()
        elif name == "stdlib":
            train, calibration, validation = self._stdlib_data()
            teacher = self.teacher
        elif name == "sampled":
            train, calibration, validation, info = self._sampled_data()
            teacher = self.teacher
        else:
            raise ValueError(f"Unknown domain {name!r}: choose one of {list(DOMAINS)}.")
        loss = self.teacher_loss if name == "embedded" else held_out_loss(teacher, validation)
        info |= {"train_samples": len(train), "validation_samples": len(validation)}
        self._domains[name] = Domain(name, train, calibration, validation, teacher, loss, info)
        return self._domains[name]

    def _stdlib_data(self):
        from hf_minitron.data import STDLIB_CORPUS, load_text_datasets

        b = self.budget
        needed = b.steps * b.batch_size
        # Packing is lazy: only the blocks asked for are tokenized, not the 12 MB of source.
        data = load_text_datasets(
            STDLIB_CORPUS,
            self.tokenizer,
            b.seq_length,
            max_train_samples=max(needed, b.calibration_samples),
            max_eval_samples=len(self.validation),
        )
        train = data["train"]
        # As in the embedded corpus: the calibration samples are the first of the training split.
        return train.select(range(needed)), train.select(range(b.calibration_samples)), as_tensors(data["validation"])

    def _sampled_data(self):
        """`steps * batch_size` training and as many held-out sequences as the embedded validation split, sampled from
        the teacher; written once to `CACHE/sampled_text.json` under a fingerprint of the teacher, the prompts and the
        sampling settings, and reused while it matches."""
        from datasets import Dataset

        from hf_minitron.fingerprints import weights_fingerprint

        b = self.budget
        prompts = [list(row["input_ids"][:PROMPT_TOKENS]) for row in self.train]
        prompts += [sample["input_ids"][:PROMPT_TOKENS].tolist() for sample in self.validation]
        settings = {
            "teacher": weights_fingerprint(self.teacher),
            "prompts": hashlib.sha256(json.dumps(prompts).encode()).hexdigest()[:16],
            "seq_length": b.seq_length,
            "temperature": SAMPLING_TEMPERATURE,
            "seed": 0,
            "torch": torch.__version__,  # the sampler's stream of random numbers may change between versions
        }
        path = CACHE / "sampled_text.json"
        stored = json.loads(path.read_text()) if path.exists() and not self.fresh else {}
        reused = stored.get("settings") == settings
        if not reused:
            started = time.time()
            ids = sample_sequences(self.teacher, prompts, b.seq_length)
            seconds = time.time() - started
            stored = {
                "settings": settings,
                "seconds": seconds,
                "generated_tokens": len(ids) * (b.seq_length - PROMPT_TOKENS),
                "input_ids": ids,
                "text": self.tokenizer.batch_decode(ids),  # for reading; the token ids are what is trained on
            }
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(stored))
            os.replace(tmp, path)
        print(
            f"teacher samples: {len(stored['input_ids'])} sequences, {stored['generated_tokens']:,} sampled tokens, "
            f"{stored['seconds']:.0f} s to generate" + (" (read from the cache)" if reused else ""),
            flush=True,
        )
        needed = b.steps * b.batch_size
        rows = stored["input_ids"]
        train = Dataset.from_dict({"input_ids": rows[:needed], "attention_mask": [[1] * b.seq_length] * needed})
        validation = as_tensors({"input_ids": r, "attention_mask": [1] * b.seq_length} for r in rows[needed:])
        info = {k: stored[k] for k in ("seconds", "generated_tokens")} | {"sequences": len(rows)}
        # Calibration from the samples too (the first of them, as in the other corpora; all of them if fewer).
        calibration = train.select(range(min(needed, b.calibration_samples)))
        return train, calibration, validation, info

    def teacher_cache(self, domain: str = "embedded"):
        """One exact (hidden-state) cache of a domain's teacher over its training split, written once under
        the claims cache: every arm of that domain reads it instead of running the teacher."""
        if domain not in self._teacher_caches:
            from hf_minitron import cache_teacher

            d = self.domain(domain)
            folder = CACHE / ("teacher_cache" if domain == "embedded" else f"teacher_cache_{domain}")
            self._teacher_caches[domain] = cache_teacher(
                d.teacher, d.train, folder, tokenizer=self.tokenizer, overwrite=True, show_progress=False
            )
        return self._teacher_caches[domain]

    def corrected_teacher(self):
        """The teacher fine-tuned on the training split for the same steps/batch/LR as the students (paper 2 §2),
        saved once under the cache. One correction (seed 0) serves every training seed, like the one pruning."""
        if self._corrected is not None:
            return self._corrected
        from transformers import AutoModelForCausalLM

        from hf_minitron.distillation.teacher_correction import TeacherCorrectionConfig, correct_teacher

        directory = CACHE / "corrected_teacher"
        marker = CACHE / "corrected_teacher.json"
        key = {"budget": asdict(self.budget)}
        if not self.fresh and _read_cache(marker, key) is not None and directory.is_dir():
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
            started = time.time()
            model = correct_teacher(model, args, self.train, processing_class=self.tokenizer)
            shutil.rmtree(args.output_dir, ignore_errors=True)
            print(f"teacher correction: {b.steps} steps in {time.time() - started:.0f} s", flush=True)
            _write_cache(marker, key, {"directory": str(directory)})
        self._corrected = model.eval().requires_grad_(False)
        return self._corrected

    # -------------------------------------------------------------------------------------- retraining
    def arm(self, name: str, make_student, domain: str = "embedded", **loss) -> dict:
        """Retrains `make_student()` on `domain` once per training seed (`DistillationTrainer`, loss weights in
        `loss`) and aggregates the held-out losses at step 0 and at `budget.eval_steps` (`aggregate_seeds`)."""
        if name not in self._arms:
            runs = [self._run(name, make_student, domain, seed, loss) for seed in range(self.seeds)]
            self._arms[name] = aggregate_seeds(runs) | {"domain": domain}
        return self._arms[name]

    def _run(self, name: str, make_student, domain: str, seed: int, loss: dict) -> dict:
        path = CACHE / "arms" / f"{name.replace('/', '__')}__seed{seed}.json"
        # The seed is in the key: a cache of the single-seed runs of earlier versions is not read as a seed's run.
        key = {"budget": asdict(self.budget), "domain": domain, "seed": seed}
        cached = _read_cache(path, key) if not self.fresh else None
        if cached is not None:
            return cached
        from transformers import TrainerCallback

        from hf_minitron import DistillationTrainer

        data = self.domain(domain)
        started = time.time()
        student = make_student()
        record = getattr(student, "pruning_record", None)
        curve = [[0, held_out_loss(student, data.validation)]]
        eval_steps, validation = set(self.budget.eval_steps), data.validation

        class HeldOutCurve(TrainerCallback):
            def on_step_end(self, args, state, control, model=None, **kwargs):
                if state.global_step in eval_steps:
                    curve.append([state.global_step, held_out_loss(model, validation)])

        output_dir = str(CACHE / "tmp" / name.replace("/", "__"))
        # The intermediate-state loss needs the live teacher's layers; every other arm reads its domain's cache.
        offline = self.offline_teacher and not loss.get("intermediate_layer_mapping")
        trainer = DistillationTrainer(
            model=student,
            teacher_model=None if offline else data.teacher,
            args=retraining_config(self.budget, output_dir, seed=seed, **loss),
            train_dataset=self.teacher_cache(domain) if offline else data.train,
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
            "seed": seed,
            "seconds": time.time() - started,
        }
        _write_cache(path, key, result)
        print(f"  arm {name} seed {seed}: {_fmt(result['before'])} -> {_fmt(result['after'])} "
              f"({result['seconds']:.0f} s)", flush=True)  # fmt: skip
        return result


def sample_sequences(teacher, prompts: list[list[int]], length: int) -> list[list[int]]:
    """Continues each prompt to `length` tokens by ancestral sampling from `teacher` at `SAMPLING_TEMPERATURE` (seed
    0), EOS included as an ordinary token (as in packed data, where it separates documents).

    A plain loop over the KV cache rather than `generate`, whose generation config (the model's own top-k/top-p,
    stopping at EOS) would change the distribution the student is meant to learn."""
    generator = torch.Generator().manual_seed(0)
    sequences = []
    with torch.no_grad():
        for start in range(0, len(prompts), SAMPLING_BATCH):
            ids = torch.tensor(prompts[start : start + SAMPLING_BATCH])
            out = teacher(input_ids=ids, use_cache=True, logits_to_keep=1)
            while ids.shape[1] < length:
                probs = torch.softmax(out.logits[:, -1].float() / SAMPLING_TEMPERATURE, dim=-1)
                token = torch.multinomial(probs, 1, generator=generator)
                ids = torch.cat([ids, token], dim=1)
                if ids.shape[1] < length:
                    out = teacher(input_ids=token, cache=out.cache, use_cache=True, logits_to_keep=1)
            sequences += ids.tolist()
    return sequences


def aggregate_seeds(runs: list[dict]) -> dict:
    """One arm's runs (one per seed) as one record: the mean held-out losses and curve, their min and max per step,
    and the per-seed values (`per_seed`) that the verdicts' noise is measured from."""
    before, after = [r["before"] for r in runs], [r["after"] for r in runs]
    steps = [step for step, _ in runs[0]["curve"]]
    by_step = [[r["curve"][i][1] for r in runs] for i in range(len(steps))]
    first = runs[0]
    return {
        "before": _mean(before),
        "after": _mean(after),
        "after_min": min(after),
        "after_max": max(after),
        "curve": [[s, _mean(v)] for s, v in zip(steps, by_step)],
        "curve_min": [[s, min(v)] for s, v in zip(steps, by_step)],
        "curve_max": [[s, max(v)] for s, v in zip(steps, by_step)],
        "per_seed": {"seed": [r["seed"] for r in runs], "before": before, "after": after},
        **{k: first[k] for k in ("parameters", "tokens", "steps", "dropped_layers", "loss_weights")},
        "seconds": sum(r["seconds"] for r in runs),
    }


def _mean(values) -> float:
    return sum(values) / len(values)


def _projection_parameters(model) -> int:
    # The intermediate-state loss adds a learned projection to the student; it is not part of the student model.
    projection = getattr(model, "minitron_projection", None)
    return 0 if projection is None else num_parameters(projection)


def _read_cache(path: Path, key: dict):
    """The cached result at `path` if it was written under exactly `key` (budget, seed or seeds, ...), else None."""
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    return data["result"] if {k: v for k, v in data.items() if k != "result"} == key else None


def _write_cache(path: Path, key: dict, result) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({**key, "result": result}, indent=2))
    os.replace(tmp, path)  # a crash never leaves a half-written cache entry


def _fmt(x: float) -> str:
    return f"{x:.3f}"


# ---------------------------------------------------------------------------------------------- verdicts
def compare(arms: dict, lower: str, higher: str, key: str = "after") -> dict:
    """One expected ordering: arm `lower` should have the lower `key` loss than arm `higher`.

    The gap is decided only beyond the noise: `delta = mean(higher) - mean(lower)` against `noise = max(range_lower,
    range_higher)`, the range being max - min over the arm's per-seed values (0 for a single deterministic value).
    `outcome` is "as expected" when delta > noise, "against" when -delta > noise, else "within noise"."""
    a, b = _values(arms[lower], key), _values(arms[higher], key)
    delta = _mean(b) - _mean(a)
    noise = max(max(a) - min(a), max(b) - min(b))
    outcome = "as expected" if delta > noise else "against" if -delta > noise else "within noise"
    return {"lower": lower, "higher": higher, "key": key, "delta": delta, "noise": noise, "outcome": outcome}


def _values(arm: dict, key: str) -> list[float]:
    return arm.get("per_seed", {}).get(key) or [arm[key]]


def verdict(comparisons: list[dict]) -> str:
    """The claim's word for its comparisons: "not held" if any goes against it beyond the noise, "held" if all go
    its way beyond it, else "within noise"."""
    outcomes = [c["outcome"] for c in comparisons]
    if "against" in outcomes:
        return "not held"
    return "held" if all(o == "as expected" for o in outcomes) else "within noise"


def _judged(claim: dict) -> dict:
    """Adds the verdict of `claim["comparisons"]`, and `held` (True only for "held") as earlier versions had it."""
    claim["verdict"] = verdict(claim["comparisons"])
    claim["held"] = claim["verdict"] == "held"
    return claim


# ---------------------------------------------------------------------------------------------- the claims
def claim_a(bench: Bench) -> dict:
    arms = {}
    for target_name, target in (("width", WIDTH), ("depth", DEPTH)):
        for method in ("activation", "magnitude", "random"):
            seeds = range(bench.budget.random_seeds) if method == "random" else [0]
            runs = [bench.post_prune(bench.prune(target, importance=method, seed=seed)) for seed in seeds]
            arms[f"{target_name}/{method}"] = {
                **runs[0],
                "before": _mean([r["before"] for r in runs]),
                "all": [r["before"] for r in runs],
                # Random importance varies with its seed: its spread is the noise its comparison is judged against.
                "per_seed": {"seed": list(seeds), "before": [r["before"] for r in runs]},
            }
    comparisons = [
        compare(arms, f"{t}/activation", f"{t}/{other}", "before")
        for t in ("width", "depth")
        for other in ("magnitude", "random")
    ]
    parts = [
        f"{t}: activation {_fmt(arms[f'{t}/activation']['before'])}, magnitude {_fmt(arms[f'{t}/magnitude']['before'])}, "
        f"random {_fmt(arms[f'{t}/random']['before'])}"
        for t in ("width", "depth")
    ]
    return _judged({
        "title": "Post-prune loss (no retraining): activation vs magnitude vs random importance",
        "expected": "activation importance gives the lowest loss for both width and depth pruning (paper 1)",
        "arms": arms,
        "comparisons": comparisons,
        "numbers": "; ".join(parts),
    })  # fmt: skip


def claim_b(bench: Bench) -> dict:
    arms = {}
    for sequence in ("mean", "l2"):
        scores = bench.scores(sequence_aggregation=sequence)
        for batch in ("l2", "mean"):
            model = bench.prune(WIDTH, scores=scores, sequence_aggregation=sequence, batch_aggregation=batch)
            arms[f"width/seq_{sequence}+batch_{batch}"] = bench.post_prune(model)
    best = min(arms, key=lambda k: arms[k]["before"])
    paper = "width/seq_mean+batch_l2"
    return _judged({
        "title": "Importance aggregation: sequence {mean, l2} x batch {l2, mean} (width target, no retraining)",
        "expected": "sequence mean + batch L2 is the best of the four (paper 1 Table 11)",
        "arms": arms,
        "comparisons": [compare(arms, paper, other, "before") for other in arms if other != paper],
        "numbers": ", ".join(f"{k.split('/')[1]} {_fmt(v['before'])}" for k, v in arms.items()) + f"; best: {best}",
    })  # fmt: skip


def _width_arm(bench: Bench, domain: str, loss: str = "kd") -> dict:
    """The width student of `domain`'s teacher, calibrated and retrained with `LOSSES[loss]` on `domain`'s data.
    The embedded arms keep the names of earlier versions."""
    prefix = "" if domain == "embedded" else f"{domain}/"
    data = bench.domain(domain)
    return bench.arm(
        f"{prefix}width/{loss}",
        lambda: bench.prune(WIDTH, teacher=data.teacher, calibration=data.calibration),
        domain=domain,
        **copy.deepcopy(LOSSES[loss]),
    )


def _width_kd(bench: Bench) -> dict:
    return _width_arm(bench, "embedded", "kd")


def _scratch_arm(bench: Bench, domain: str) -> dict:
    # Random weights owe nothing to the teacher: the corrected domain (same data) shares the embedded arm.
    domain = "embedded" if domain == "corrected" else domain
    prefix = "" if domain == "embedded" else f"{domain}/"
    return bench.arm(f"{prefix}width/random_init/ce", lambda: bench.random_init(WIDTH), domain=domain, **LOSSES["ce"])


def _by_domain(bench: Bench, group) -> dict:
    """`group(domain)` -> `(arms, comparisons, numbers)` for every domain of `DOMAINS`, judged one by one; the
    embedded group is the claim's own result (as in the other claims), the others its `premises`."""
    groups = {}
    for name, label in DOMAINS.items():
        print(f"  data: {label}", flush=True)
        arms, comparisons, numbers = group(name)
        data = bench.domain(name)
        groups[name] = _judged({
            "data": label,
            "teacher_loss": data.teacher_loss,
            "data_info": data.info,
            "arms": arms,
            "comparisons": comparisons,
            "numbers": numbers,
        })  # fmt: skip
    main = groups.pop("embedded")
    keys = ("teacher_loss", "arms", "comparisons", "numbers", "verdict", "held")
    return {k: main[k] for k in keys} | {"premises": groups}


def claim_c(bench: Bench) -> dict:
    steps = bench.budget.steps

    def group(domain):
        arms = {
            "width/pruned+kd": _width_arm(bench, domain, "kd"),
            "width/pruned+ce": _width_arm(bench, domain, "ce"),
            "width/random_init+ce": _scratch_arm(bench, domain),
        }
        kd, ce, scratch = (arms[k]["after"] for k in arms)
        comparisons = [compare(arms, "width/pruned+kd", other) for other in list(arms)[1:]]
        return arms, comparisons, f"after {steps} steps: pruned+KD {_fmt(kd)}, pruned+CE {_fmt(ce)}, random init+CE " \
            f"{_fmt(scratch)}"  # fmt: skip

    return {
        "title": "Equal-token retraining: pruned+KD vs pruned+CE vs random init+CE (same architecture)",
        "expected": "pruned+KD has the lowest loss: pruning+distillation beats training from scratch and plain CE",
        **_by_domain(bench, group),
    }


def _depth_kd(bench: Bench, method: str) -> dict:
    return bench.arm(f"depth/{method}/kd", lambda: bench.prune(DEPTH, depth_method=method))


def claim_d(bench: Bench) -> dict:
    arms = {"width": _width_kd(bench), "depth (contiguous)": _depth_kd(bench, "contiguous")}
    w, d = arms["width"], arms["depth (contiguous)"]
    return _judged({
        "title": "Width vs depth pruning at equal parameters (84.4M vs 85.0M), KD retraining",
        "expected": "width pruning has the lower loss after retraining (paper 1 Table 13, paper 2)",
        "arms": arms,
        "comparisons": [compare(arms, "width", "depth (contiguous)")],
        "numbers": f"before retraining: width {_fmt(w['before'])}, depth {_fmt(d['before'])}; after "
        f"{bench.budget.steps} KD steps: width {_fmt(w['after'])}, depth {_fmt(d['after'])}",
    })  # fmt: skip


def claim_e(bench: Bench) -> dict:
    arms = {
        "depth/contiguous": _depth_kd(bench, "contiguous"),
        "depth/block_influence": _depth_kd(bench, "block_influence"),
    }
    c, bi = arms["depth/contiguous"], arms["depth/block_influence"]
    return _judged({
        "title": "Depth: contiguous block vs individually Block-Influence-ranked layers (14 of 30 dropped), KD",
        "expected": "the contiguous block has the lower loss after retraining (paper 2)",
        "arms": arms,
        "comparisons": [compare(arms, "depth/contiguous", "depth/block_influence")],
        "numbers": f"before: contiguous {_fmt(c['before'])}, BI {_fmt(bi['before'])}; after {bench.budget.steps} KD "
        f"steps: contiguous {_fmt(c['after'])}, BI {_fmt(bi['after'])}",
    })  # fmt: skip


def claim_f(bench: Bench) -> dict:
    corrected = bench.domain("corrected")
    arms = {"correction off": _width_kd(bench), "correction on": _width_arm(bench, "corrected", "kd")}
    off, on = arms["correction off"], arms["correction on"]
    return _judged({
        "title": "Teacher correction on vs off (each teacher pruned to the width target, distils its own student)",
        "expected": "the student of the corrected teacher has the lower loss on the new data (paper 2 §2)",
        "arms": arms,
        "teacher_loss": {"original": bench.teacher_loss, "corrected": corrected.teacher_loss},
        "comparisons": [compare(arms, "correction on", "correction off")],
        "numbers": f"teacher {_fmt(bench.teacher_loss)} -> corrected {_fmt(corrected.teacher_loss)}; student after "
        f"{bench.budget.steps} KD steps: off {_fmt(off['after'])}, on {_fmt(on['after'])}",
    })  # fmt: skip


def claim_g(bench: Bench) -> dict:
    steps = bench.budget.steps

    def group(domain):
        arms = {"logits": _width_arm(bench, domain, "kd"), "logits+ce": _width_arm(bench, domain, "kd+ce")}
        # The intermediate-state arm runs the live teacher's layers: only in the claim's own setting (the premise
        # arms are about logits vs +CE).
        if domain == "embedded":
            arms["logits+intermediate"] = _width_arm(bench, domain, "kd+is")
        comparisons = [compare(arms, "logits", other) for other in list(arms)[1:]]
        numbers = f"after {steps} steps: " + ", ".join(f"{k} {_fmt(v['after'])}" for k, v in arms.items())
        return arms, comparisons, numbers

    return {
        "title": "KD loss: logits only vs logits+CE vs logits+intermediate states (width student)",
        "expected": "logits-only is at least as good as either addition for a width-pruned student (paper 1)",
        **_by_domain(bench, group),
    }


def claim_h(bench: Bench) -> dict:
    # Two variants (PrunedConfig.head_merge): "query" merges the heads' own query rows, as paper 1 §2.3 describes for
    # grouped-query attention (SmolLM2: 9 query heads in 3 KV groups); "o_proj" merges their o_proj columns.
    arms = {
        "width/merge off": _width_kd(bench),
        "width/merge query": bench.arm("width/head_merge_query/kd", lambda: bench.prune(WIDTH, head_merge="query")),
        # The arm name of the o_proj variant is the one `head_merge=True` had (what `true` still means).
        "width/merge o_proj": bench.arm("width/head_merge/kd", lambda: bench.prune(WIDTH, head_merge="o_proj")),
        "heads_only/merge off": bench.post_prune(bench.prune(HEADS_ONLY)),
        "heads_only/merge query": bench.post_prune(bench.prune(HEADS_ONLY, head_merge="query")),
        "heads_only/merge o_proj": bench.post_prune(bench.prune(HEADS_ONLY, head_merge="o_proj")),
    }
    off, query, o_proj = (arms[f"width/merge {k}"] for k in ("off", "query", "o_proj"))
    heads_only = {k: arms[f"heads_only/merge {k}"]["before"] for k in ("off", "query", "o_proj")}
    return _judged({
        "title": "Residual head merge: off vs query rows (the paper's) vs o_proj columns",
        "expected": "merging the pruned heads into the kept ones (query rows) lowers the loss (paper 1 §2.3)",
        "arms": arms,
        "comparisons": [compare(arms, "width/merge query", "width/merge off", key) for key in ("before", "after")],
        "numbers": f"width before: off {_fmt(off['before'])}, query {_fmt(query['before'])}, o_proj "
        f"{_fmt(o_proj['before'])}; width after {bench.budget.steps} KD steps: off {_fmt(off['after'])}, query "
        f"{_fmt(query['after'])}, o_proj {_fmt(o_proj['after'])}; heads only (9 -> 6) before: off "
        f"{_fmt(heads_only['off'])}, query {_fmt(heads_only['query'])}, o_proj {_fmt(heads_only['o_proj'])}",
    })  # fmt: skip


def search_ready() -> str | None:
    """Why claim i cannot run, or None: it needs `hf_minitron/pruning/search.py` committed with its tests."""
    root = Path(__file__).resolve().parent.parent
    for path in ("hf_minitron/pruning/search.py", "tests/pruning/test_search.py"):
        tracked = subprocess.run(["git", "ls-files", "--error-unmatch", path], cwd=root, capture_output=True)
        if tracked.returncode != 0:
            return f"{path} is not committed yet"
    return None


def claim_i(bench: Bench) -> dict:
    from hf_minitron.pruning.parameter_count import count_parameters
    from hf_minitron.pruning.search import search_architectures
    from hf_minitron.pruning.search_config import SearchConfig

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
    best = result.best.to_dict()
    # The search ranks its candidates with one seed; its pick is then retrained like every arm, once per seed, so
    # that the comparison with the hand-chosen architecture has a spread.
    options = {
        k: v for k, v in best["pruned_config"].items() if k not in ("calibration_samples", "depth_calibration_samples")
    }
    pick_name = f"search pick ({best['name']})"
    arms = {
        "hand-chosen width": _width_kd(bench),
        pick_name: bench.arm(f"search_pick/{best['name']}/kd", lambda: bench.prune(options)),
    }
    hand, pick = arms["hand-chosen width"], arms[pick_name]
    ranking = [c.to_dict() for c in result.ranking()]
    return _judged({
        "title": "Search pick vs hand-chosen width architecture at the same budget (±5%), equal KD steps",
        "expected": "the search's pick is at least as good as the hand-chosen architecture",
        "arms": arms,
        "ranking": ranking,
        "search_record": _search_arm(best),
        "comparisons": [compare(arms, pick_name, "hand-chosen width")],
        "numbers": f"after {b.steps} KD steps: hand-chosen {_fmt(hand['after'])}, search pick {_fmt(pick['after'])} "
        f"(of {len(ranking)} candidates)",
    })  # fmt: skip


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
VERDICT_RULE = (
    "Verdicts: each expected ordering of two arms is decided only when the gap between their means exceeds the noise, "
    "|Δmean| > max(range_a, range_b), where an arm's range is max - min of its per-seed values (0 for a deterministic "
    "post-prune loss). A claim is **held** when every ordering it makes goes its way beyond the noise, **not held** "
    "when any goes against it beyond the noise, and **within noise** otherwise."
)


def _groups(claim: dict) -> list[tuple[str, dict]]:
    """`(data label, group)` pairs of a claim: the claim itself on the embedded corpus, then its premise groups."""
    return [(DOMAINS["embedded"], claim)] + [(g["data"], g) for g in claim.get("premises", {}).values()]


def sentence(letter: str, claim: dict) -> str:
    if claim.get("status") == "not run":
        return f"**{letter}. {claim['title']}** — not run: {claim['reason']}."
    text = f"**{letter}. {claim['title']}** — {claim['verdict']} (expected: {claim['expected']}): {claim['numbers']}."
    premises = [f"{g['data']}: {g['verdict']} ({g['numbers']})" for g in claim.get("premises", {}).values()]
    return text + (" Where the premise holds — " + "; ".join(premises) + "." if premises else "")


def _spread(arm: dict, key: str) -> tuple[str, str]:
    """`(mean (min–max), per-seed values)` of an arm's `key` loss, as table cells."""
    values = _values(arm, key)
    if min(values) == max(values):  # one seed, or a loss before retraining (the same student in every seed)
        return _fmt(arm[key]), "-"
    return f"{_fmt(arm[key])} ({_fmt(min(values))}–{_fmt(max(values))})", " / ".join(_fmt(v) for v in values)


def render_markdown(results: dict) -> str:
    b, setup = results["budget"], results["setup"]
    seeds = results.get("seeds", 1)
    lines = [
        f"Command: `{results.get('command', 'python benchmarks/claims.py')}`.",
        "",
        f"Teacher: SmolLM2-135M ({setup['teacher_parameters']:,} parameters), held-out loss "
        f"{_fmt(setup['teacher_loss'])} on {setup['validation_samples']} validation samples of {b['seq_length']} "
        f"tokens of the embedded corpus. Retraining arms: {b['steps']} steps x batch {b['batch_size']} x "
        f"{b['seq_length']} tokens = {b['steps'] * b['batch_size'] * b['seq_length']:,} tokens each (one epoch of the "
        f"same samples), AdamW at a constant LR {b['learning_rate']}, {seeds} training seed(s) 0..{seeds - 1} per arm "
        "(the seed sets the batch order and the trainer's RNG; the pruned student is the same). Calibration: "
        f"{b['calibration_samples']} samples ({b['depth_samples']} for depth scoring).",
        "",
        "Data of claims c and g (each student pruned with calibration samples of its data and evaluated on that "
        "data's own held-out split, so losses compare within a data row only): "
        + "; ".join(f"*{DOMAINS[k]}*: {v}" for k, v in DOMAIN_NOTES.items())
        + ".",
        "",
        VERDICT_RULE,
        "",
        "| claim | data (teacher loss) | arm | parameters | loss after pruning | loss after retraining: mean (min–max) "
        "| per seed | verdict |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for letter, claim in results["claims"].items():
        if claim.get("status") == "not run":
            lines.append(f"| {letter} | - | not run | - | - | - | - | - |")
            continue
        for label, group in _groups(claim):
            teacher = f" ({_fmt(group['teacher_loss'])})" if isinstance(group.get("teacher_loss"), float) else ""
            for i, (name, arm) in enumerate(group["arms"].items()):
                before = _spread(arm, "before")[0]
                after, per_seed = _spread(arm, "after") if "after" in arm else ("-", _spread(arm, "before")[1])
                params = f"{arm['parameters']:,}" if arm.get("parameters") else "-"
                word = group["verdict"] if i == 0 else ""
                word = f"**{word}**" if word == "not held" else word
                data = label + teacher if i == 0 else ""
                lines.append(f"| {letter} | {data} | {name} | {params} | {before} | {after} | {per_seed} | {word} |")
    lines += [
        "",
        "Comparisons (Δ = mean of the arm expected higher − mean of the arm expected lower; noise = the larger range):",
        "",
        "| claim | data | expected lower | than | loss | Δ mean | noise | outcome |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for letter, claim in results["claims"].items():
        for label, group in _groups(claim) if claim.get("status") != "not run" else []:
            for c in group["comparisons"]:
                lines.append(
                    f"| {letter} | {label} | {c['lower']} | {c['higher']} | {c['key']} | {c['delta']:+.3f} | "
                    f"{c['noise']:.3f} | {c['outcome']} |"
                )
    sampled = results["claims"].get("c", results["claims"].get("g", {})).get("premises", {}).get("sampled")
    if sampled:
        info = sampled["data_info"]
        lines.append(
            f"\nTeacher samples: {info['sequences']} sequences of {b['seq_length']} tokens ({info['generated_tokens']:,} "
            f"sampled tokens) generated in {info['seconds']:.0f} s, cached under the claims cache."
        )
    lines += ["", *[sentence(k, v) + "\n" for k, v in results["claims"].items()]]
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
        # Our own torch threads make a load of about their number; only load beyond that is other jobs.
        threads = re.search(r"(\d+) torch threads", setup["machine"])
        shared = threads is None or max(loads) > int(threads.group(1)) + 0.5
        lines.append(
            f"\nMachine load while the claims ran: 1-minute load average {min(loads):.1f} to {max(loads):.1f} on "
            f"{os.cpu_count()} cores"
            + (
                " (other jobs shared the CPU, so the wall times are pessimistic)."
                if shared
                else f", no more than the benchmark's own {threads.group(1)} torch threads."
            )
        )
    lines.append(
        f"\nTotal wall time of the claims {results['wall_seconds_all_claims']:.0f} s on {setup['machine']}. Arms shared "
        "between claims are trained once: a claim's wall time excludes arms an earlier claim had already trained."
    )
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    claims = results["claims"]
    premise_claims = [k for k, c in claims.items() if c.get("premises")]
    panels = len(claims) + (1 if premise_claims else 0)
    cols = 3
    rows = math.ceil(panels / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 3.8 * rows), squeeze=False)
    teacher_loss = results["setup"]["teacher_loss"]
    for ax, (letter, claim) in zip(axes.flat, claims.items()):
        if claim.get("status") == "not run":
            ax.text(0.5, 0.5, f"{letter}: not run\n{claim['reason']}", ha="center", va="center", wrap=True)
            ax.axis("off")
            continue
        curves = {k: v for k, v in claim["arms"].items() if v.get("curve")}
        if curves:
            for name, arm in curves.items():
                steps, mean = [s for s, _ in arm["curve"]], [v for _, v in arm["curve"]]
                # Clamped at 0: the mean of equal values can differ from them in the last bit.
                low = [max(0.0, m - v) for m, (_, v) in zip(mean, arm.get("curve_min", arm["curve"]))]
                high = [max(0.0, v - m) for m, (_, v) in zip(mean, arm.get("curve_max", arm["curve"]))]
                ax.errorbar(steps, mean, yerr=[low, high], marker="o", ms=3, capsize=3, label=name)
            ax.set_xlabel("retraining step (mean over seeds, bars: min–max)")
        else:
            names = list(claim["arms"])
            means = [claim["arms"][n]["before"] for n in names]
            spans = [_values(claim["arms"][n], "before") for n in names]
            yerr = [
                [max(0.0, m - min(v)) for m, v in zip(means, spans)],
                [max(0.0, max(v) - m) for m, v in zip(means, spans)],
            ]
            ax.bar(range(len(names)), means, yerr=yerr, capsize=3, color="tab:blue")
            ax.set_xticks(range(len(names)), [n.replace("/", "\n").replace("+", "+\n") for n in names], fontsize=7)
        ax.axhline(teacher_loss, color="k", ls="--", lw=0.8, label="teacher")
        ax.set_title(f"{letter}. {claim['verdict']} (pydoc topics)", fontsize=10)
        ax.set_ylabel("held-out loss")
        ax.legend(fontsize=7)
    if premise_claims:
        # The verdict rule drawn: a gap (bar) is decided when its ±noise bar does not reach zero.
        ax = list(axes.flat)[len(claims)]
        width = 0.8 / len(premise_claims)
        for j, letter in enumerate(premise_claims):
            groups = _groups(claims[letter])
            first = [g["comparisons"][0] for _, g in groups]
            x = [i + (j - (len(premise_claims) - 1) / 2) * width for i in range(len(groups))]
            label = f"{letter}: {first[0]['higher']} − {first[0]['lower']}"
            ax.bar(x, [c["delta"] for c in first], width, yerr=[c["noise"] for c in first], capsize=3, label=label)
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xticks(range(len(groups)), [label.replace(", ", ",\n") for label, _ in groups], fontsize=7)
        ax.set_ylabel("Δ mean held-out loss (> 0: as expected)")
        ax.set_title("c, g by data: gap ± noise (max range)", fontsize=10)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[panels:]:
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
    parser.add_argument("--scale", type=float, help="Multiplies steps, calibration and validation (default 1).")
    parser.add_argument("--seeds", type=int, help="Training seeds per retraining arm (default 3): spread, verdicts.")
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"Smoke run: --scale 0.1 --seeds 2 and output and cache under {QUICK}, unless given.",
    )
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
    parser.add_argument("--output", help=f"Results JSON (default {RESULTS / 'claims.json'}).")
    parser.add_argument("--cache-dir", help=f"Where finished claims and arms are cached (default {CACHE}).")
    args = parser.parse_args(argv)
    args.scale = args.scale if args.scale is not None else (0.1 if args.quick else 1.0)
    args.seeds = args.seeds if args.seeds is not None else (2 if args.quick else 3)
    if args.seeds < 1:
        raise SystemExit(f"--seeds={args.seeds}: use at least 1 (3 or more for verdicts with a spread).")
    letters = parse_claims(args.claims)
    output = Path(args.output or (QUICK / "claims.json" if args.quick else RESULTS / "claims.json"))
    CACHE = Path(args.cache_dir or (QUICK / "cache" if args.quick else CACHE))
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
        key = {"budget": asdict(budget), "seeds": args.seeds}
        cached = None if args.fresh else _read_cache(path, key)
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
            bench = Bench(budget, args.fresh, offline_teacher=not args.live_teacher, seeds=args.seeds)
        print(f"claim {letter}: running ...", flush=True)
        claim_start, load_start = time.time(), os.getloadavg()[0]
        claim = CLAIM_FUNCTIONS[letter](bench)
        claim["wall_seconds"] = time.time() - claim_start
        claim["load_average"] = [load_start, os.getloadavg()[0]]
        _write_cache(path, key, claim)
        claims[letter] = claim
        premises = "".join(f"; {g['data']}: {g['verdict']}" for g in claim.get("premises", {}).values())
        print(f"claim {letter}: {claim['verdict']}{premises} ({claim['wall_seconds']:.0f} s) -- {claim['numbers']}",
              flush=True)  # fmt: skip

    if bench is None:  # every claim cached: the setup numbers come from the last full results
        previous = json.loads(output.read_text()) if output.exists() else {}
        setup = previous.get("setup")
        if setup is None:
            bench = Bench(budget, args.fresh, offline_teacher=not args.live_teacher, seeds=args.seeds)
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
        "seeds": args.seeds,
        "verdict_rule": VERDICT_RULE,
        "budget": asdict(budget),
        "tokens_per_arm": budget.tokens,
        "setup": setup,
        "claims": claims,
        "wall_seconds": time.time() - started,
        "wall_seconds_all_claims": sum(c.get("wall_seconds", 0) for c in claims.values()),
    }
    atomic_write_json(output, results)
    markdown = render_markdown(results)
    atomic_write_text(output.with_suffix(".md"), "# Minitron claims at small scale\n\n" + markdown + "\n")
    plot(results, output.with_suffix(".png"))
    print(markdown)


if __name__ == "__main__":
    main()
