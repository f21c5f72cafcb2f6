"""Architecture search under a parameter budget ([paper 1](https://arxiv.org/abs/2407.14679) §3, Table 9).

1. Enumerate every shape (layers, hidden size, MLP neurons, attention heads, optionally KV groups) whose exact size
   (total or non-embedding parameters, or weight memory) is within ±`tolerance` of the budget, on configurable
   multiples, within caps on how much each axis may lose, and loadable by stock transformers.
2. Estimate importance ONCE and prune every candidate from a deep copy of the teacher (never the teacher itself).
3. Retrain each candidate lightly with knowledge distillation (paper 1: ~400 steps) and evaluate it every
   `eval_interval` steps by held-out LM loss or any `scorer(model) -> float`. `retrain_steps=0` ranks the pruned
   candidates as they are, as NVIDIA ModelOpt's Minitron search does; `retrain_top_k` retrains only the best of them.
4. Rank the candidates at every evaluated step and report the step after which the order of the top candidates no
   longer changes (paper 1 finds the ranking settles after ~300 steps).

Results go to `search_results.{json,md,png}`; with an `output_dir`, every finished candidate is saved atomically and
a rerun skips it.
"""

import copy
import gc
import hashlib
import json
import logging
import os
import tempfile
import time
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import TrainerCallback

from ..data import iter_samples
from ..io import atomic_directory, atomic_write_text
from ..runtime import release_freed_memory
from .candidates import Candidate, enumerate_candidates, teacher_budget
from .importance import ImportanceScores, model_shape
from .parameter_count import count_parameters
from .search_config import SearchConfig
from .search_results import CandidateResult, SearchResult


logger = logging.getLogger(__name__)


SETTINGS_NAME = "search_settings.json"


# ---------------------------------------------------------------------------------------------- the search
class _EvaluateAtSteps(TrainerCallback):
    """Evaluates the student at the chosen global steps of its retraining (the points of the loss-vs-steps curve)."""

    def __init__(self, steps, evaluate, record):
        self.steps, self.evaluate, self.record = steps, evaluate, record

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step in self.steps and model is not None:
            self.record(state.global_step, self.evaluate(model))


def default_retraining_config(output_dir: str):
    """The `DistillationConfig` of the lightweight retraining when none is given: the Minitron KD loss (logit-only
    forward KL) at a constant learning rate, so the result at step k is that of k steps of training whatever
    `retrain_steps` is."""
    from ..distillation.config import DistillationConfig

    return DistillationConfig(
        output_dir=output_dir, lr_scheduler_type="constant", report_to="none", save_strategy="no"
    )


def _retraining_args(template, output_dir: str, config: SearchConfig, show_progress: bool):
    return replace(
        template,
        output_dir=output_dir,
        max_steps=config.retrain_steps,
        save_strategy="no",
        eval_strategy="no",
        load_best_model_at_end=False,
        report_to="none",
        logging_steps=config.eval_interval,
        disable_tqdm=template.disable_tqdm or not show_progress,
    )


def _settings(teacher, config: SearchConfig, template, metric: str, higher_is_better: bool, train, evaluation):
    """What a finished candidate's result depends on: a rerun reuses results only when these match."""
    ignored = {"output_dir", "logging_dir", "run_name", "disable_tqdm", "logging_steps", "report_to", "hub_token"}
    training = None
    if template is not None:
        training = {k: v for k, v in json.loads(template.to_json_string()).items() if k not in ignored}
    return {
        "teacher": model_shape(teacher.config),
        "teacher_parameters": sum(p.numel() for p in teacher.parameters()),
        "teacher_fingerprint": _fingerprint(p.detach() for p in teacher.parameters()),
        "pruning": config.base_pruned_config().to_dict(),
        "retrain_steps": config.retrain_steps,
        "eval_steps": config.eval_steps,
        "eval_batch_size": config.eval_batch_size,
        "metric": metric,
        "higher_is_better": higher_is_better,
        "train_data": _data_fingerprint(train),
        "eval_data": _data_fingerprint(evaluation),
        "training": training,
    }


def _fingerprint(tensors, edge: int = 4096) -> str:
    """A hash of the first and last `edge` values of each tensor: tells two teachers (or datasets) apart without
    reading every weight of a large model."""
    digest = hashlib.sha256()
    for tensor in tensors:
        flat = tensor.reshape(-1)
        part = flat if flat.numel() <= 2 * edge else torch.cat([flat[:edge], flat[-edge:]])
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(part.to("cpu", torch.float64).numpy().tobytes())
    return digest.hexdigest()[:16]


def _data_fingerprint(dataset) -> dict | None:
    if dataset is None:
        return None
    samples = list(iter_samples(dataset))
    return {"samples": len(samples), "hash": _fingerprint(torch.as_tensor(s["input_ids"]) for s in samples)}


def _check_settings(output_dir: Path, settings: dict) -> None:
    path = output_dir / SETTINGS_NAME
    if path.is_file():
        saved = json.loads(path.read_text(encoding="utf-8"))
        changed = sorted(k for k in set(saved) | set(settings) if saved.get(k) != settings.get(k))
        if changed:
            raise ValueError(
                f"{str(output_dir)!r} holds search results made with other settings ({', '.join(changed)} differ): "
                "finished candidates cannot be reused. Choose another output_dir, or delete this one to start over."
            )
    else:
        output_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(settings, indent=1, sort_keys=True))


def search_architectures(
    teacher,
    config: SearchConfig,
    train_dataset=None,
    eval_dataset=None,
    *,
    scores: ImportanceScores | None = None,
    calibration_data=None,
    output_dir: str | os.PathLike | None = None,
    scorer=None,
    higher_is_better: bool | None = None,
    distillation_config=None,
    processing_class=None,
    teacher_cache=None,
    show_progress: bool = True,
) -> SearchResult:
    """Searches the architectures within `config`'s budget: one importance pass, every candidate pruned from a copy
    of `teacher`, lightly retrained by distillation, evaluated along the way, and ranked.

    Args:
        teacher (`PreTrainedModel`): a supported `*ForCausalLM`. Its weights are never modified.
        config ([`SearchConfig`]): budget, search space, retraining steps and evaluation interval.
        train_dataset (*optional*): tokenized samples (`input_ids`, optional `attention_mask`) for the KD retraining;
            required when `config.retrain_steps > 0`.
        eval_dataset (*optional*): tokenized held-out samples for the held-out LM loss; required without `scorer`.
        scores ([`ImportanceScores`], *optional*): importance of `teacher`, to skip the importance pass.
        calibration_data (*optional*): samples for importance estimation and LM-loss depth selection; defaults to
            `train_dataset`.
        output_dir (`str`, *optional*): where the importance scores, one result per finished candidate and
            `search_results.{json,md,png}` are written. A rerun with the same settings skips finished candidates.
        scorer (`Callable[[PreTrainedModel], float]`, *optional*): ranks by this instead of the held-out loss, e.g.
            `make_lm_eval_scorer(tokenizer)` or `make_perplexity_scorer(dataset)`.
        higher_is_better (`bool`, *optional*): the direction of `scorer`; required with a scorer (both scorers of
            `hf_minitron.evaluation` are higher-is-better). The held-out loss is lower-is-better.
        distillation_config ([`DistillationConfig`], *optional*): the retraining hyperparameters (learning rate,
            batch size, KD loss, seed, ...). `max_steps` is `config.retrain_steps`, and checkpointing, Trainer
            evaluation and reporting are turned off. Defaults to [`default_retraining_config`].
        processing_class (*optional*): the tokenizer, passed to the trainer.
        teacher_cache (`str` or `datasets.Dataset`, *optional*): run the teacher once for all candidates instead of
            once per candidate (issue 15): `"hidden"` writes an exact cache of `train_dataset` ([`cache_teacher`]) to
            `output_dir/teacher_cache` (reused by a rerun; a temporary directory without `output_dir`), or pass a
            cache written from `teacher` (any mode; it is the training data when `train_dataset` is None). The
            candidates are then retrained from it without the teacher.
        show_progress (`bool`, *optional*, defaults to `True`): progress bars.

    Returns:
        [`SearchResult`]: every candidate's metric per step, ranks per step, the best candidate and when the ranking
        stabilised.
    """
    from .prune import compute_scores, prune_model

    # 1. Everything that can fail, before any forward pass.
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError(
            "search_architectures runs in one process (each candidate is a short single-process training run): "
            "launch it without several processes, e.g. `accelerate launch --num_processes 1` or plain `python`."
        )
    candidates = enumerate_candidates(teacher.config, config)
    if scorer is None:
        if eval_dataset is None:
            raise ValueError(
                "search_architectures ranks by held-out loss without a scorer: pass eval_dataset (tokenized held-out "
                "samples), or a scorer with higher_is_better."
            )
        if higher_is_better is not None:
            raise ValueError("higher_is_better describes a scorer: drop it, or pass scorer= as well.")
        metric, higher_is_better = "heldout_loss", False
    else:
        if not callable(scorer):
            raise ValueError(f"scorer must be a callable model -> float, got {type(scorer).__name__}.")
        if not isinstance(higher_is_better, bool):
            raise ValueError(
                "A scorer needs an explicit direction: pass higher_is_better=True (e.g. accuracy, or the scorers of "
                "hf_minitron.evaluation) or higher_is_better=False (e.g. a loss)."
            )
        metric = "score"
    if isinstance(teacher_cache, str) and teacher_cache != "hidden":
        raise ValueError(
            f"teacher_cache={teacher_cache!r} is not supported: pass 'hidden' (an exact cache written here), or a "
            "teacher cache dataset written with hf_minitron.cache_teacher (e.g. mode='topk')."
        )
    if teacher_cache is not None and not isinstance(teacher_cache, str) and train_dataset is None:
        train_dataset = teacher_cache  # a cache holds its training samples
    if config.retrain_steps > 0 and train_dataset is None:
        raise ValueError(
            f"SearchConfig.retrain_steps={config.retrain_steps} needs train_dataset for the KD retraining: pass it, "
            "or set retrain_steps=0 to rank the pruned candidates without retraining."
        )
    for name, dataset in (("train_dataset", train_dataset), ("eval_dataset", eval_dataset)):
        if dataset is not None and hasattr(dataset, "__len__") and len(dataset) == 0:
            raise ValueError(f"search_architectures got an empty {name}: pass tokenized samples (input_ids).")
    base_config = config.base_pruned_config()
    calibration_data = calibration_data if calibration_data is not None else train_dataset
    if scores is None and base_config.importance == "activation" and calibration_data is None:
        raise ValueError(
            "Minitron importance needs calibration_data (or train_dataset): pass tokenized samples, precomputed "
            "scores=..., or set SearchConfig.pruning={'importance': 'magnitude'}."
        )
    if scores is not None:
        scores.check_compatible(teacher.config, teacher)
    template = distillation_config
    if template is None and config.retrain_steps > 0:
        template = default_retraining_config(tempfile.gettempdir())
    elif template is not None:
        from ..distillation.config import DistillationConfig

        if not isinstance(template, DistillationConfig):
            raise ValueError(f"distillation_config must be a DistillationConfig, got {type(template).__name__}.")
    root = Path(output_dir) if output_dir is not None else None
    if root is not None:
        if root.exists() and not root.is_dir():
            raise FileExistsError(f"output_dir {str(root)!r} is a file: choose a directory.")
        settings = _settings(teacher, config, template, metric, higher_is_better, train_dataset, eval_dataset)
        if teacher_cache is not None:  # a top-k cache changes the retraining
            settings["teacher_cache"] = teacher_cache if isinstance(teacher_cache, str) else _cache_mode(teacher_cache)
        _check_settings(root, settings)

    teacher_counts = {
        "total": count_parameters(teacher.config),
        "non_embedding": count_parameters(teacher.config, count="non_embedding"),
        "memory": count_parameters(teacher.config, count="memory", dtype=config.memory_dtype),
    }
    _, target = teacher_budget(teacher.config, config)
    was_training = teacher.training
    requires_grad = [p.requires_grad for p in teacher.parameters()]
    records = {c.name: _load_record(root, c.name) for c in candidates}
    temporary = None
    try:
        # 2. One importance pass (reused from output_dir on a rerun).
        if scores is None and root is not None and (root / "importance" / "importance.json").is_file():
            scores = ImportanceScores.load(root / "importance")
            scores.check_compatible(teacher.config, teacher)
        if scores is None:
            scores = compute_scores(teacher, base_config, calibration_data, show_progress)
            if root is not None:
                scores.save(root / "importance")

        evaluate = partial(_evaluate, eval_dataset=eval_dataset, batch_size=config.eval_batch_size, scorer=scorer)
        # 3. One teacher pass for every candidate's retraining (issue 15) when asked, instead of one per candidate.
        cache = None
        if teacher_cache is not None and config.retrain_steps > 0:
            cache, temporary = _teacher_cache(teacher, teacher_cache, train_dataset, root, processing_class,
                                              show_progress)  # fmt: skip

        def run(candidate: Candidate, retrain: bool) -> CandidateResult:
            record = records.get(candidate.name) or _new_record(candidate)
            start = time.perf_counter()
            student = copy.deepcopy(teacher)
            prune_model(student, candidate.pruned_config, calibration_data, scores=scores, show_progress=False)
            # The teacher may be frozen (the trainer freezes it): the copy must train.
            student.requires_grad_(True)

            def store(step: int, values: dict) -> None:
                record.metric[step] = values["metric"]
                if values["heldout_loss"] is not None:
                    record.heldout_loss[step] = values["heldout_loss"]

            if 0 not in record.metric:
                store(0, evaluate(student))
            if retrain:
                _retrain(student, teacher if cache is None else None, candidate, record, template, config, store,
                         evaluate, train_dataset if cache is None else cache, processing_class,
                         show_progress)  # fmt: skip
            record.retrained = retrain
            record.seconds += time.perf_counter() - start
            del student
            gc.collect()  # the trainer and the student reference each other: free them before the next candidate
            release_freed_memory()
            _save_record(root, record)
            return record

        def finished(name: str, steps: list[int]) -> bool:
            record = records.get(name)
            return record is not None and all(step in record.metric for step in steps)

        full_steps = config.eval_steps
        retrain_all = config.retrain_steps > 0 and config.retrain_top_k is None
        progress = tqdm(total=len(candidates), desc="Architecture search", unit="candidate", disable=not show_progress)
        for candidate in candidates:
            progress.set_postfix_str(candidate.name)
            if not finished(candidate.name, full_steps if retrain_all else [0]):
                records[candidate.name] = run(candidate, retrain=retrain_all)
            progress.update()
        progress.close()
        if config.retrain_steps > 0 and config.retrain_top_k is not None:
            # ModelOpt-style pre-selection: rank the pruned candidates, retrain only the best k.
            pool = _partial_result(candidates, records, [0], metric, higher_is_better, config, target, teacher_counts)
            top = [c.name for c in pool.ranking(0)[: config.retrain_top_k]]
            for candidate in tqdm([c for c in candidates if c.name in top], desc="Retraining the top candidates",
                                  unit="candidate", disable=not show_progress):  # fmt: skip
                if not finished(candidate.name, full_steps):
                    records[candidate.name] = run(candidate, retrain=True)
        if root is not None:
            scores.save(root / "importance")  # keeps the depth-selection losses computed on the way
    finally:
        teacher.train(was_training)
        for param, flag in zip(teacher.parameters(), requires_grad):
            param.requires_grad_(flag)
        if temporary is not None:
            temporary.cleanup()

    steps = full_steps if config.retrain_steps > 0 else [0]
    result = _partial_result(candidates, records, steps, metric, higher_is_better, config, target, teacher_counts)
    result.teacher["shape"] = model_shape(teacher.config)
    logger.info("Best candidate: %s; top order stable from step %s.", result.best.name, result.stable_step())
    if root is not None:
        result.save(root)
    return result


def _evaluate(model, eval_dataset, batch_size: int, scorer) -> dict:
    """`{"metric", "heldout_loss"}` of `model`: the scorer's value when there is one, else the held-out loss."""
    from ..evaluation import heldout_perplexity

    was_training = model.training
    try:
        with torch.no_grad():
            loss = heldout_perplexity(model, eval_dataset, batch_size)["loss"] if eval_dataset is not None else None
            value = float(scorer(model)) if scorer is not None else loss
    finally:
        model.train(was_training)
    return {"metric": value, "heldout_loss": loss}


def _retrain(
    student, teacher, candidate, record, template, config, store, evaluate, train, processing_class, progress
):
    from ..distillation.trainer import DistillationTrainer

    steps = set(config.eval_steps) - {0}
    with tempfile.TemporaryDirectory(prefix="hf-minitron-search-") as tmp:
        trainer = DistillationTrainer(
            model=student,
            teacher_model=teacher,
            args=_retraining_args(template, tmp, config, progress),
            train_dataset=train,
            processing_class=processing_class,
            callbacks=[_EvaluateAtSteps(steps, evaluate, store)],
        )
        if not progress:
            from transformers.trainer_callback import PrinterCallback

            trainer.remove_callback(PrinterCallback)  # with the bars off, Trainer prints every log dict instead
        trainer.train()
        for entry in trainer.state.log_history:
            if "loss" in entry and entry.get("step") in steps:
                record.train_loss[entry["step"]] = entry["loss"]
        del trainer
    missing = steps - set(record.metric)
    if missing:
        raise RuntimeError(
            f"Candidate {candidate.name} stopped before steps {sorted(missing)}: the training data is too short for "
            f"{config.retrain_steps} steps at this batch size? Check train_dataset."
        )


def _cache_mode(cache) -> dict:
    from ..distillation.teacher_cache import cache_directory, read_cache_info

    info = read_cache_info(cache_directory(cache))
    return {key: info[key] for key in ("mode", "dtype", "top_k", "temperature")}


def _teacher_cache(teacher, teacher_cache, train, root, tokenizer, show_progress):
    """`(cache dataset, temporary directory or None)`: the given cache (checked against the teacher and the data), or
    an exact one of `train` written under `root` (or a temporary directory)."""
    from ..distillation.teacher_cache import cache_teacher, check_teacher_cache

    if not isinstance(teacher_cache, str):
        check_teacher_cache(teacher_cache, teacher=teacher, dataset=None if train is teacher_cache else train)
        return teacher_cache, None
    temporary = None
    if root is None:
        temporary = tempfile.TemporaryDirectory(prefix="hf-minitron-teacher-cache-")
    directory = (root if root is not None else Path(temporary.name)) / "teacher_cache"
    cache = cache_teacher(teacher, train, directory, mode="hidden", tokenizer=tokenizer, show_progress=show_progress)
    return cache, temporary


def _new_record(candidate: Candidate) -> CandidateResult:
    return CandidateResult(
        name=candidate.name,
        pruned_config=candidate.pruned_config,
        shape=candidate.shape,
        parameters=candidate.parameters,
        budget_value=candidate.budget_value,
    )


def _load_record(root: Path | None, name: str) -> CandidateResult | None:
    path = root / "candidates" / name / "result.json" if root is not None else None
    if path is None or not path.is_file():
        return None
    return CandidateResult.from_dict(json.loads(path.read_text(encoding="utf-8")))


def _save_record(root: Path | None, record: CandidateResult) -> None:
    if root is None:
        return
    with atomic_directory(root / "candidates" / record.name, overwrite=True) as tmp:
        (tmp / "result.json").write_text(json.dumps(record.to_dict(), indent=1), encoding="utf-8")


def _partial_result(candidates, records, steps, metric, higher_is_better, config, target, teacher_counts):
    results = []
    for candidate in candidates:
        record = copy.deepcopy(records[candidate.name])
        record.rank = {}
        results.append(record)
    return SearchResult(
        candidates=results,
        steps=list(steps),
        metric=metric,
        higher_is_better=higher_is_better,
        count=config.count,
        target=target,
        tolerance=config.tolerance,
        teacher={"parameters": teacher_counts},
        config=config.to_dict(),
    )
