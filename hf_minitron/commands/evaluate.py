"""Evaluate checkpoints on disk: what `hf-minitron evaluate` and `recipes/evaluate.py` run.

The papers compare the pruned and distilled student with its teacher on the same benchmarks
([paper 1](https://arxiv.org/abs/2407.14679) Table 2, [paper 2](https://arxiv.org/abs/2408.11796) Table 1); this
module loads one or two checkpoints, runs them through [`~hf_minitron.evaluation.evaluate_model`] /
[`~hf_minitron.evaluation.compare_models`] (lm-eval tasks, optional held-out perplexity) and writes one JSON file.
"""

import json
import logging
import math
from dataclasses import dataclass, field

from ..data import EMBEDDED_CORPUS
from ..validation import check_numbers, check_same_tokenizer, check_sequence_length, load_model_config


logger = logging.getLogger(__name__)


DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class EvaluateArguments:
    """Which checkpoints to evaluate, on what, and where the result goes.

    Args:
        model (`str`): the checkpoint to evaluate (the student), or `embedded`.
        teacher (`str`, *optional*): a second checkpoint to compare with (the teacher). A teacher with another
            tokenizer is evaluated with its own on the lm-eval tasks; held-out perplexity (per token) is then refused,
            as it cannot be compared across tokenizers.
        tasks (`str`, *optional*, defaults to `"pydoc_topics"`): comma-separated lm-eval tasks (`pydoc_topics` runs
            offline; the papers' benchmarks are downloaded by lm-eval); `""` for held-out perplexity only.
        num_fewshot (`int`, *optional*): shots for every task; each task's default when unset.
        limit (`float`, *optional*): documents per task (a value in (0, 1) is a fraction); for quick checks.
        batch_size (`int`, *optional*, defaults to `8`): requests per forward pass.
        heldout_dataset (`str`, *optional*): also measure held-out perplexity on the validation split of this text
            source (`embedded`, local files or a Hub dataset; split as in [`~hf_minitron.data.load_text_datasets`]).
        text_column (`str`, *optional*, defaults to `"text"`): column holding the held-out text.
        seq_length (`int`, *optional*, defaults to `256`): packed length of the held-out samples.
        max_eval_samples (`int`, *optional*, defaults to `64`): held-out samples.
        output_file (`str`, *optional*, defaults to `"outputs/evaluation.json"`): where the JSON result is written;
            an existing file there is replaced only if it is an earlier result (a JSON object of this command).
        dtype (`str`, *optional*, defaults to `"float32"`): dtype to load the models in.
    """

    model: str = field(default="embedded", metadata={"help": "Checkpoint to evaluate (the student) or 'embedded'."})
    teacher: str | None = field(default=None, metadata={"help": "Optional second checkpoint to compare with."})
    tasks: str = field(default="pydoc_topics", metadata={"help": "Comma-separated lm-eval task names ('' for none)."})
    num_fewshot: int | None = field(default=None, metadata={"help": "Shots for every task (default: per task)."})
    limit: float | None = field(default=None, metadata={"help": "Documents per task (<1: a fraction), quick checks."})
    batch_size: int = field(default=8, metadata={"help": "Requests per forward pass."})
    heldout_dataset: str | None = field(
        default=None,
        metadata={
            "help": f"Held-out perplexity on the validation split of this text source (e.g. '{EMBEDDED_CORPUS}')."
        },
    )
    text_column: str = field(default="text", metadata={"help": "Column holding the held-out text."})
    seq_length: int = field(default=256, metadata={"help": "Packed length of the held-out samples (tokens)."})
    max_eval_samples: int = field(default=64, metadata={"help": "Held-out samples."})
    output_file: str = field(default="outputs/evaluation.json", metadata={"help": "Where the JSON result goes."})
    dtype: str = field(default="float32", metadata={"help": "Load dtype: float32, bfloat16 or float16."})

    def __post_init__(self):
        check_numbers(self)
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r} is not supported: use one of {list(DTYPES)}.")
        if not [t for t in self.tasks.split(",") if t.strip()] and self.heldout_dataset is None:
            raise ValueError(
                f"tasks={self.tasks!r} names no task and heldout_dataset is unset: nothing to evaluate. Name lm-eval "
                f"tasks (e.g. 'pydoc_topics') or set heldout_dataset (e.g. '{EMBEDDED_CORPUS}')."
            )
        if self.limit is not None and not 0 < self.limit < math.inf:
            raise ValueError(f"limit={self.limit} is invalid: use a positive count, a fraction in (0, 1), or None.")


def evaluate_checkpoints(args: EvaluateArguments, show_progress: bool = True) -> dict:
    """Evaluates `args.model` (and compares it with `args.teacher` when given); writes `args.output_file`.

    Only the main process evaluates (the models are small enough for one device at evaluation time, and lm-eval runs
    an in-memory model in a single process); the others wait and read the result.

    Returns:
        `dict`: the [`~hf_minitron.evaluation.compare_models`] output with a teacher, else
        `{"model": name, "results": ..., "heldout": ...}`.
    """
    import torch
    from accelerate import PartialState
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..data import load_text_datasets
    from ..evaluation import check_task_names

    if [t for t in args.tasks.split(",") if t.strip()]:
        check_task_names([t.strip() for t in args.tasks.split(",") if t.strip()])  # before any model is loaded
    from ..embedded import resolve_model_path
    from ..evaluation import compare_models, evaluate_model, heldout_perplexity, print_comparison, save_json

    state = PartialState()
    if state.is_main_process:
        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
        limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit

        def load(path):
            # trust_remote_code=False: a checkpoint's own modeling code is never run (nor asked about on stdin).
            return AutoModelForCausalLM.from_pretrained(
                path, dtype=getattr(torch, args.dtype), trust_remote_code=False
            )

        # The output, both checkpoints and both tokenizers are checked before any weights are loaded.
        _check_results_file(args.output_file)
        for name in (args.model, args.teacher):
            if name is not None:
                model_config = load_model_config(resolve_model_path(name))
                if args.heldout_dataset is not None:
                    check_sequence_length(model_config, args.seq_length, "EvaluateArguments.seq_length")
        student_path = resolve_model_path(args.model)
        tokenizer = AutoTokenizer.from_pretrained(student_path, trust_remote_code=False)
        teacher_tokenizer = None
        if args.teacher is not None:
            teacher_path = resolve_model_path(args.teacher)
            teacher_tokenizer = AutoTokenizer.from_pretrained(teacher_path, trust_remote_code=False)
            try:
                check_same_tokenizer(tokenizer, teacher_tokenizer, args.model, args.teacher)
                teacher_tokenizer = None  # shared: one tokenizer for both
            except ValueError:
                if args.heldout_dataset is not None:
                    raise ValueError(
                        f"The teacher {args.teacher!r} has another tokenizer than {args.model!r}: held-out perplexity "
                        "is per token, so the two cannot be compared on heldout_dataset. Drop --heldout_dataset to "
                        "compare them on the lm-eval tasks (each with its own tokenizer), or evaluate each alone."
                    ) from None
                logger.warning(
                    "%s and %s have different tokenizers: each is evaluated with its own.", args.model, args.teacher
                )
        student = load(student_path)
        heldout = None
        if args.heldout_dataset is not None:
            data = load_text_datasets(
                args.heldout_dataset,
                tokenizer,
                args.seq_length,
                args.text_column,
                max_train_samples=1,  # only the validation split is used
                max_eval_samples=args.max_eval_samples,
            )
            if "validation" not in data:
                raise ValueError(
                    f"heldout_dataset={args.heldout_dataset!r} has no validation split at seq_length={args.seq_length}"
                    ": pass more documents or a smaller seq_length."
                )
            heldout = data["validation"]
        options = {"tasks": tasks, "num_fewshot": args.num_fewshot, "limit": limit, "batch_size": args.batch_size}
        if args.teacher is None:
            result = {"model": args.model, "results": evaluate_model(student, tokenizer, **options) if tasks else {}}
            if heldout is not None:
                result["heldout"] = heldout_perplexity(student, heldout, batch_size=args.batch_size)
            save_json(result, args.output_file)
            if show_progress:
                for task, value in result["results"].items():
                    print(f"{task}: {value['primary_metric']} = {value['metrics'][value['primary_metric']]:.4f}")
                if heldout is not None:
                    print(f"held-out perplexity: {result['heldout']['perplexity']:.3f}")
        else:
            teacher = load(teacher_path)
            result = compare_models(
                teacher,
                student,
                tokenizer,
                teacher_tokenizer=teacher_tokenizer,
                heldout_dataset=heldout,
                teacher_name=args.teacher,
                student_name=args.model,
                output_file=args.output_file,
                **options,
            )
            if show_progress:
                print_comparison(result)
    state.wait_for_everyone()
    if not state.is_main_process:
        with open(args.output_file, encoding="utf-8") as f:
            result = json.load(f)
    return result


def _check_results_file(path: str) -> None:
    """`path` must be writable and hold no file but an earlier result: `--output_file notes.txt` must not replace it."""
    from ..io import check_output_file

    path = check_output_file(path)
    if not path.exists():
        return
    try:
        previous = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        previous = None
    if not (isinstance(previous, dict) and ("models" in previous or "model" in previous)):
        raise FileExistsError(
            f"Output file {str(path)!r} exists and is not an earlier evaluation result (a JSON object written by "
            "hf-minitron evaluate): refusing to replace it. Choose another --output_file."
        )
