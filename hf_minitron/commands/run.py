"""The whole Minitron chain, stage by stage, resumable:

    correct teacher (optional) -> estimate importance -> prune -> distill -> on-policy distillation (optional)
    -> SFT (optional) -> DPO / RPO (optional) -> evaluate teacher and student -> model card -> push (optional)

Every stage writes one directory under `output_dir` atomically, and records the settings and inputs it is made from
in `{stage}.settings.json` next to it. A finished stage whose record matches this run is reused, not recomputed, so
rerunning the same command after an interruption continues at the first unfinished stage. A rerun with other
settings is refused before any stage runs, naming the settings that changed (a model is never reused under settings
it was not made with): rerun with the original settings, or start afresh in a new `output_dir`. The evaluation and the
final folder (card) are redone instead when only their own settings changed.

The YAML config has top-level `MinitronArguments` keys and one section per stage whose keys are exactly the fields
of that stage's dataclass: `pruning` (`PrunedConfig`), `distillation` (`DistillationConfig`), `teacher_correction`
(`TeacherCorrectionConfig`), `on_policy` (`OnPolicyConfig`: after KD, the student samples continuations of prompts
cut from the training samples and the live teacher scores them, GKD), and the alignment stages (paper 2, §4) `sft`
(`AlignmentArguments` + `trl.SFTConfig` + the LoRA fields of `trl.ModelConfig`) and `dpo` (the same with `RPOConfig`).
These three run when their section is present (`--sft null` drops it), each on the previous one's result: on-policy
distillation starts from the distilled student, SFT from that (or the distilled student), DPO from the SFT result. `output_dir` of the trainer sections, `final_model_dir` and the model path are set by the
pipeline.
"""

import json
import logging
import os
from pathlib import Path

from ..data import EMBEDDED_CORPUS, STDLIB_CORPUS, load_text_datasets
from ..output_lock import output_locks
from ..pruning.config import PrunedConfig
from ..validation import (
    check_finite_weights,
    check_process_group,
    check_sequence_length,
    load_model_config,
)
from .run_config import ALIGNMENT_STAGES, AlignmentStage, MinitronArguments, OnPolicyStage, check_prunes_something
from .run_console import StageLog, print_run_summary, stage_titles
from .run_records import CHECKPOINTS, STAGES, plan_stages, stage_records, write_records


logger = logging.getLogger(__name__)


def _datasets(args: MinitronArguments, tokenizer):
    data = load_text_datasets(
        args.dataset,
        tokenizer,
        args.seq_length,
        args.text_column,
        max_train_samples=args.max_train_samples,
        max_eval_samples=args.max_eval_samples,
    )
    return data["train"], data.get("validation")


def run_pipeline(
    args: MinitronArguments,
    pruning: PrunedConfig,
    distillation,
    correction,
    alignment: list[OnPolicyStage | AlignmentStage] | None = None,
    show_progress: bool = True,
    report: bool = True,
) -> dict:
    """Runs (or resumes) the chain; returns the summary dict that also goes into the model card.

    `alignment` lists the stages to run after distillation, in order: on-policy distillation, SFT, DPO, each present
    only when its recipe section is (see [`build_pipeline_config`]).
    `show_progress` shows the progress bars; `report` prints (on the main process) a heading with the time as each
    stage starts (or says that it was reused), and at the end the teacher-vs-student table and each stage's wall time.

    Holds the output lock of every folder it writes (one writer per folder, see `output_lock.py`).
    """
    with output_locks(args.output_dir):
        return _run_pipeline(args, pruning, distillation, correction, alignment, show_progress, report)


def _run_pipeline(
    args: MinitronArguments,
    pruning: PrunedConfig,
    distillation,
    correction,
    alignment: list[OnPolicyStage | AlignmentStage] | None = None,
    show_progress: bool = True,
    report: bool = True,
) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..distillation.trainer import DistillationTrainer
    from ..embedded import resolve_model_path
    from ..evaluation import compare_models
    from ..io import atomic_directory, atomic_save_model, check_not_overlapping, resume_checkpoint
    from .prune import PruneArguments, prune_checkpoint

    check_prunes_something(pruning)
    state = _process_group(distillation)
    root = Path(args.output_dir)
    teacher_path = resolve_model_path(args.teacher)
    # Bad checkpoints, lengths, outputs and credentials fail here, in seconds, not after hours of training.
    teacher_config = load_model_config(teacher_path)
    check_sequence_length(teacher_config, args.seq_length, "MinitronArguments.seq_length")
    for stage in alignment or []:
        if stage.name == "on_policy":  # the student keeps the teacher's positions: pruning never changes them
            on_policy = stage.training_args
            length = on_policy.prompt_length + on_policy.max_completion_length
            check_sequence_length(teacher_config, length, "on_policy.prompt_length + on_policy.max_completion_length")
    for name in (*STAGES, *CHECKPOINTS.values(), "evaluation.json"):
        check_not_overlapping(root / name, teacher_path, "the teacher")
    if args.push_to_hub:
        from ..hub import check_push_ready

        check_push_ready(args.hub_model_id)
    if [t for t in args.eval_tasks.split(",") if t]:
        from ..evaluation import check_task_names

        check_task_names([t for t in args.eval_tasks.split(",") if t])
    if pruning.depth_scorer is not None:  # before teacher correction, not hours later when pruning starts
        from ..evaluation import check_task_names

        check_task_names(pruning.depth_scorer_tasks())
    # Each stage is reused only if its record (settings + inputs) matches this run: checked for every stage first.
    records = stage_records(args, pruning, distillation, correction, alignment, teacher_path)
    reuse = plan_stages(root, records)
    state.wait_for_everyone()  # every process has read the records before the main one rewrites them
    if state.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        write_records(root, records)
    state.wait_for_everyone()
    # trust_remote_code=False throughout: a checkpoint's own modeling code is never run (nor asked about on stdin).
    tokenizer = AutoTokenizer.from_pretrained(teacher_path, trust_remote_code=False)
    train, validation = _datasets(args, tokenizer)
    stages = StageLog(root, stage_titles(args, alignment), report=report and state.is_main_process)
    stages.keep_times = state.is_main_process
    teacher_hub_id = _teacher_hub_id(args.teacher)
    summary: dict = {
        "teacher": args.teacher,
        # The card's base_model: a Hub id, or the embedded teacher's upstream id.
        "teacher_hub_id": teacher_hub_id,
        # What tables and cards call the teacher: its Hub id, else the path it was given as.
        "teacher_name": teacher_hub_id or args.teacher,
        "datasets": None
        if args.dataset in (EMBEDDED_CORPUS, STDLIB_CORPUS) or Path(args.dataset.split(",")[0]).exists()
        else [args.dataset],
        "hub_model_id": args.hub_model_id,
        # A student is a derivative of its teacher: it carries the teacher's license.
        "license": _teacher_license(args.teacher, teacher_path),
        "stages": {},
    }

    # 1. Teacher correction (paper 2): fine-tune the teacher on the distillation data before pruning.
    if args.correct_teacher:
        corrected = root / "teacher_correction"
        stages.begin("teacher_correction", reuse["teacher_correction"], corrected)
        if not reuse["teacher_correction"]:
            from ..distillation.teacher_correction import correct_teacher

            correct_teacher(teacher_path, correction, train_dataset=train, processing_class=tokenizer)
        stages.end("teacher_correction")
        _drop_checkpoints(root, "teacher_correction", args.keep_checkpoints or not state.is_main_process)
        teacher_path = str(corrected)
        # Settings, not the local path of the corrected teacher: the card is published.
        summary["stages"]["teacher_correction"] = {
            "max_steps": correction.max_steps,
            "learning_rate": correction.learning_rate,
            "dataset": ", ".join(Path(d).name for d in args.dataset.split(",")),
        }

    # 2. Importance estimation + pruning (one pass of forward hooks; scores saved next to the student).
    pruned_dir = root / "pruned"
    stages.begin("pruned", reuse["pruned"], pruned_dir)
    if not reuse["pruned"]:
        prune_checkpoint(
            PruneArguments(
                teacher=teacher_path,
                output_dir=str(pruned_dir),
                calibration_data=args.dataset,
                text_column=args.text_column,
                overwrite=True,
            ),
            pruning,
            show_progress=show_progress,
        )
    stages.end("pruned")
    summary["stages"]["pruning"] = json.loads((pruned_dir / "pruning_summary.json").read_text())
    summary["stages"]["pruning"]["pruned_config"] = pruning.to_dict()

    # 3. Distillation of the pruned student from the (corrected) teacher.
    distilled_dir = root / "distilled"
    stages.begin("distilled", reuse["distilled"], distilled_dir)
    if not reuse["distilled"]:
        student = AutoModelForCausalLM.from_pretrained(pruned_dir, trust_remote_code=False)
        teacher = AutoModelForCausalLM.from_pretrained(teacher_path, trust_remote_code=False)
        trainer = DistillationTrainer(
            model=student,
            teacher_model=teacher,
            args=distillation,
            train_dataset=train,
            eval_dataset=validation,
            processing_class=tokenizer,
        )
        # An interrupted distillation continues from its newest complete checkpoint.
        trainer.train(resume_from_checkpoint=resume_checkpoint(distillation))
        if trainer.state.global_step == 0:
            # A pruned model published as "distilled" (and carded as such) would be a wrong result reported as one.
            raise ValueError(
                f"The distillation stage trained 0 steps ({len(train) if hasattr(train, '__len__') else 'streamed'} training samples, max_steps="
                f"{distillation.max_steps}, num_train_epochs={distillation.num_train_epochs}): raise max_train_samples "
                "or max_steps. Nothing was written for this stage."
            )
        history = json.dumps(trainer.state.log_history, indent=1)
        atomic_save_model(
            trainer, distilled_dir, write_extra=lambda tmp: (tmp / "log_history.json").write_text(history)
        )
        del trainer, student, teacher
    stages.end("distilled")
    _drop_checkpoints(root, "distilled", args.keep_checkpoints or not state.is_main_process)
    log_history = json.loads((distilled_dir / "log_history.json").read_text())
    summary["stages"]["distillation"] = {
        "kd_loss": distillation.kd_loss,
        "kd_temperature": distillation.kd_temperature,
        "max_steps": distillation.max_steps,
        "learning_rate": distillation.learning_rate,
        "tokens": _tokens_seen(log_history, distillation, args.seq_length, state.num_processes),
        "log_history": log_history,
    }

    # 4. On-policy distillation (GKD), then alignment (paper 2, §4): SFT, then DPO / RPO, each on the previous stage's
    # checkpoint.
    model_dir = distilled_dir
    for stage in alignment or []:
        stage_dir = root / stage.name
        stages.begin(stage.name, reuse[stage.name], stage_dir)
        if not reuse[stage.name] and stage.name == "on_policy":
            # The live (corrected) teacher scores the student's samples of prompts cut from the training samples.
            stage.run(model_dir, teacher_path, train, tokenizer)
        elif not reuse[stage.name]:
            # An interrupted stage continues from its newest complete checkpoint (if it saved any).
            stage.training_args.resume_from_checkpoint = resume_checkpoint(stage.training_args)
            stage.run(model_dir)
        stages.end(stage.name)
        _drop_checkpoints(root, stage.name, args.keep_checkpoints or not state.is_main_process)
        summary["stages"][stage.name] = stage.describe()
        model_dir = stage_dir
    made = " + ".join(
        ["Minitron-pruned", "distilled", *(_MADE.get(stage.name, stage.name.upper()) for stage in alignment or [])]
    )
    model_name = args.hub_model_id or _student_name(
        summary["teacher_name"], summary["stages"]["pruning"]["after"]["parameters"]["total"]
    )
    summary["model_name"] = model_name
    student_name = f"{model_name} ({made})"

    # 5. Evaluation: held-out loss + lm-eval tasks, teacher and student side by side.
    eval_path = root / "evaluation.json"
    stages.begin("evaluation", reuse["evaluation"], eval_path)
    # A reused evaluation must be of this chain's student and settings: one made before a stage was added is redone.
    if not reuse["evaluation"]:
        # lm-eval runs an in-memory model in a single process (elsewhere it returns no results): the main process
        # evaluates while the others wait (within the process group's timeout, `distillation.ddp_timeout`).
        if state.is_main_process:
            teacher = AutoModelForCausalLM.from_pretrained(teacher_path, dtype=torch.float32, trust_remote_code=False)
            student = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, trust_remote_code=False)
            compare_models(
                teacher,
                student,
                tokenizer,
                tasks=[t for t in args.eval_tasks.split(",") if t],
                limit=args.eval_limit,
                heldout_dataset=validation,
                teacher_name=summary["teacher_name"],
                student_name=student_name,
                output_file=eval_path,  # written atomically
                report=stages.report,
            )
        state.wait_for_everyone()
    stages.end("evaluation")
    summary["evaluation"] = json.loads(eval_path.read_text())

    # 6. Final folder: the last stage's checkpoint + model card + plots (rebuilt with a new evaluation).
    final_dir = root / "final"
    stages.begin("final", reuse["final"], final_dir)
    if state.is_main_process and not reuse["final"]:
        import shutil

        with atomic_directory(final_dir, overwrite=True) as tmp:
            for item in model_dir.iterdir():
                # training_args.bin is a pickle: the published folder holds safetensors and JSON only.
                if item.name not in ("log_history.json", "training_args.bin"):
                    shutil.copy2(item, tmp / item.name)
            for name in ("pruned_config.json", "pruning_record.json"):
                if (pruned_dir / name).is_file():
                    shutil.copy2(pruned_dir / name, tmp / name)
            _enable_cache(tmp / "config.json")
            check_finite_weights(tmp)  # never card (or push) a model with NaN/inf weights
            if args.write_model_card:
                # The quick start loads the model from where it is going to be: its Hub repository, else this folder.
                # No local path in a card meant for the Hub: `push` writes the repository id in its place.
                _write_card(tmp, summary, pruned_dir, model_id=args.hub_model_id)
    state.wait_for_everyone()
    stages.end("final")
    summary["final_dir"] = str(final_dir)

    # 7. Optional upload (main process only; token from the environment or login, never logged).
    if args.push_to_hub:
        stages.begin("push", False, args.hub_model_id)
        if state.is_main_process:
            from ..hub import HubUploadError, push_to_hub

            try:
                push_to_hub(str(final_dir), args.hub_model_id, private=args.hub_private)
            except HubUploadError as error:
                # The run itself succeeded: say so, and how to upload the folder once the Hub answers.
                raise ValueError(
                    f"{error} The finished model stays in {str(final_dir)!r}; upload it with `hf-minitron push "
                    f"--folder {final_dir} --repo_id {args.hub_model_id}`."
                ) from None
        stages.end("push")
    summary["stage_times"] = stages.times
    if stages.report:
        print_run_summary(summary)
    return summary


# How the evaluation names a student made by each stage after distillation (alignment stages by their acronym).
_MADE = {"on_policy": "on-policy distilled"}


def _drop_checkpoints(root: Path, stage: str, keep: bool) -> None:
    """Removes the `checkpoint-N` folders the Trainer wrote for `stage` once the stage's result is saved, and their
    resume record: they only serve to resume it. Anything else in the folder (ours or not) stays."""
    import shutil

    from ..io import RESUME_RECORD_NAME

    folder = root / CHECKPOINTS[stage]
    if keep or not (root / stage / "config.json").is_file() or not folder.is_dir():
        return
    for checkpoint in folder.glob("checkpoint-*"):
        if checkpoint.is_dir() and not checkpoint.is_symlink():
            shutil.rmtree(checkpoint)
    (folder / RESUME_RECORD_NAME).unlink(missing_ok=True)  # what the checkpoints were made with: gone with them
    if not any(folder.iterdir()):
        folder.rmdir()


def _enable_cache(config_path: Path) -> None:
    # Training saves `use_cache: false` (TrainingArguments.use_cache defaults to False, and the Trainer copies it into
    # the model's config): the published model should generate with its KV cache, as the teacher does.
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if config.get("use_cache") is False:
        config["use_cache"] = True
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _teacher_hub_id(teacher: str) -> str | None:
    """The Hub id of the teacher: the upstream id of the embedded one, the name itself when it is not a local path."""
    from ..embedded import EMBEDDED_ALIASES

    if teacher in EMBEDDED_ALIASES:
        return "HuggingFaceTB/SmolLM2-135M-Instruct"
    return None if Path(os.path.expanduser(teacher)).exists() else teacher


def _teacher_license(teacher: str, teacher_path: str) -> str | None:
    """The license in the teacher's model card (its `README.md` metadata), or the embedded teacher's (SmolLM2 is
    Apache 2.0); `None` when the teacher says nothing, and the card then says nothing either."""
    from ..embedded import EMBEDDED_ALIASES

    if teacher in EMBEDDED_ALIASES:
        return "apache-2.0"
    readme = Path(teacher_path) / "README.md"
    if not readme.is_file():
        return None
    from huggingface_hub import ModelCard

    try:
        return ModelCard.load(readme).data.license
    except Exception:  # a README without valid metadata: no license is known, which the card then shows
        return None


def _student_name(teacher_name: str, parameters: int) -> str:
    """`SmolLM2-135M-Instruct-Minitron-80M`: the teacher's name and the student's size (NVIDIA's Minitron naming)."""
    base = Path(teacher_name.rstrip("/")).name or "model"
    if parameters >= 1e9:
        size = f"{parameters / 1e9:.1f}B"
    else:
        size = f"{round(parameters / 1e6)}M" if parameters >= 1e6 else f"{round(parameters / 1e3)}K"
    return f"{base}-Minitron-{size}"


def _process_group(distillation):
    """The processes' shared state, set up as the trainers set it up, before pruning splits its calibration data."""
    from accelerate import PartialState

    # TrainingArguments initialises the distributed state (gloo on CPU with use_cpu or $ACCELERATE_USE_CPU, NCCL on
    # GPUs); a bare PartialState() would see one process per CPU worker and let every one of them write.
    check_process_group(distillation, "distillation.use_cpu")
    return PartialState()


def _tokens_seen(log_history, config, seq_length: int, processes: int) -> int:
    steps = max((entry.get("step", 0) for entry in log_history), default=0)
    return int(
        steps * config.per_device_train_batch_size * config.gradient_accumulation_steps * processes * seq_length
    )


def _write_card(directory: Path, summary: dict, pruned_dir: Path, model_id: str | None) -> None:
    """Model card + plots from what the stages recorded (importance from the scores saved with the pruned model)."""
    from ..model_card import PipelineSummary, save_model_card
    from ..pruning.importance import ImportanceScores

    pruning = summary["stages"]["pruning"]
    before, after = pruning["before"], pruning["after"]
    record = json.loads((pruned_dir / "pruning_record.json").read_text())
    # The plots show the axes that were pruned, from the scores saved next to the pruned model.
    plots = {}

    def pruned(axis: str) -> bool:
        return bool(before.get(axis) and after.get(axis) and after[axis] < before[axis])

    if (pruned_dir / "importance" / "importance.json").is_file():
        scores = ImportanceScores.load(pruned_dir / "importance")
        if scores.block_influence is not None:
            plots["layer_importance"] = scores.block_influence.tolist()
        if scores.heads and pruned("num_attention_heads"):
            plots.update(head_importance=scores.head_scores().tolist(), kept_heads=record.get("heads"))
        if scores.neurons and pruned("intermediate_size"):
            plots.update(neuron_importance=scores.neuron_scores().tolist(), kept_neurons=after["intermediate_size"])
        if scores.hidden and pruned("hidden_size"):
            plots.update(hidden_importance=scores.hidden_scores().tolist(), kept_hidden=after["hidden_size"])
    distillation = {k: v for k, v in summary["stages"]["distillation"].items() if k != "log_history"}
    card = PipelineSummary(
        model_name=summary["model_name"],
        model_id=model_id,
        teacher_id=summary.get("teacher_hub_id"),
        teacher_name=summary.get("teacher_name"),
        datasets=summary.get("datasets"),
        license=summary.get("license"),
        teacher_config={k: v for k, v in pruning["before"].items() if k != "parameters"},
        student_config={k: v for k, v in pruning["after"].items() if k != "parameters"},
        pruned_config=pruning["pruned_config"],
        teacher_parameters=pruning["before"]["parameters"]["total"],
        student_parameters=pruning["after"]["parameters"]["total"],
        dropped_layers=record.get("dropped_layers") or None,
        **plots,
        teacher_correction=summary["stages"].get("teacher_correction"),
        distillation=distillation,
        log_history=summary["stages"]["distillation"]["log_history"],
        evaluation=summary.get("evaluation"),
        on_policy={k: v for k, v in summary["stages"].get("on_policy", {}).items() if k != "path"} or None,
        alignment=_alignment_rows(summary["stages"]),
    )
    save_model_card(card, directory)


def _alignment_rows(stages: dict) -> dict | None:
    """The card's alignment table: one `"SFT max_steps"`-style row per recorded setting of each alignment stage."""
    ran = [name for name in ALIGNMENT_STAGES if name in stages]
    if not ran:
        return None
    rows = {"Stages": " → ".join(name.upper() for name in ran)}
    for name in ran:
        for key, value in stages[name].items():
            if key != "path":
                rows[f"{name.upper()} {key}"] = value
    return rows
