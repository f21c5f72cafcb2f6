"""On-policy distillation after KD: the student samples continuations, the teacher scores them.

Logit distillation on a fixed corpus (the KD stage) teaches the student the teacher's next-token distribution on
*text the teacher would read*; at generation time the student conditions on *its own* samples, whose mistakes it was
never taught to recover from. GKD ([Agarwal et al. 2024](https://arxiv.org/abs/2306.13649)) trains on the student's
own continuations instead: for each prompt the student samples a completion, the teacher's next-token distribution is
computed on that same completion, and the loss is the generalised Jensen-Shannon divergence between the two (`beta=1`
the mode-seeking reverse KL, TRL's default; `beta=0.5` the symmetric JSD; `beta=0` the forward KL).

The trainer is TRL's [`~trl.DistillationTrainer`] (generation, GKD loss chunked over the vocabulary, vLLM, FSDP /
ZeRO-3). This module adds what our pipeline needs around it: [`OnPolicyConfig`] (TRL's config plus how prompts are cut
from packed training samples, with checks that name the field and the fix), [`prompts_from_samples`] and
[`build_on_policy_trainer`], which refuses a bad teacher, vocabulary, dataset or length before any model runs.

The teacher must score the student's fresh samples, so it runs live: a teacher cache (`cache_teacher`) holds the
teacher's outputs on the corpus only and cannot serve this stage.
"""

import os
from dataclasses import dataclass, field

from trl import DistillationConfig as TRLDistillationConfig

from ..hub import keep_token_out_of_pickles
from ..validation import check_numbers


@dataclass
class OnPolicyConfig(TRLDistillationConfig):
    r"""[`~trl.DistillationConfig`] plus how prompts are taken from our packed training data.

    Every field of TRL's config keeps its meaning and default: `beta` (`1.0`, reverse KL; `0.5` symmetric JSD; `0.0`
    forward KL), `temperature` (`1.0`, of the samples and of the loss), `max_completion_length` (tokens sampled per
    prompt), `learning_rate` (`1e-6`), `use_vllm`, ... (see TRL's documentation).

    Args:
        prompt_length (`int`, *optional*, defaults to `64`):
            Tokens cut from the start of each packed training sample to make its prompt (see
            [`prompts_from_samples`]); the student continues it for up to `max_completion_length` tokens. Ignored for
            a dataset that already has a `prompt` column.
    """

    prompt_length: int = field(
        default=64, metadata={"help": "Tokens of each packed training sample used as its prompt."}
    )

    def __post_init__(self):
        # TRL's own range check of beta does not say what the values mean: ours runs first and does.
        if isinstance(self.beta, (int, float)) and not 0.0 <= self.beta <= 1.0:
            raise ValueError(
                f"OnPolicyConfig.beta={self.beta!r} is invalid: use a value in [0, 1] (1.0 reverse KL, the default; "
                "0.5 the symmetric JSD; 0.0 forward KL)."
            )
        super().__post_init__()
        check_numbers(self)  # finite floats, steps, batch sizes, learning rate in range
        keep_token_out_of_pickles(self)  # checkpoints pickle these arguments (training_args.bin)
        if isinstance(self.prompt_length, bool) or not isinstance(self.prompt_length, int) or self.prompt_length < 1:
            raise ValueError(
                f"OnPolicyConfig.prompt_length={self.prompt_length!r} is invalid: use a positive number of tokens "
                "(e.g. 64) cut from each training sample as its prompt."
            )
        if not self.temperature > 0:
            raise ValueError(
                f"OnPolicyConfig.temperature={self.temperature!r} is invalid: use a positive sampling temperature "
                "(1.0 samples from the student's own distribution)."
            )
        length = self.max_completion_length
        if isinstance(length, bool) or not isinstance(length, int) or length < 1:
            raise ValueError(
                f"OnPolicyConfig.max_completion_length={length!r} is invalid: use a positive number of tokens "
                "(e.g. 128) for the student to sample after each prompt."
            )


def prompts_from_samples(dataset, tokenizer, prompt_length: int):
    """A `prompt` column cut from packed training samples: the first `prompt_length` tokens of each, as text.

    TRL's trainer tokenizes text prompts itself, so the tokens are decoded; special tokens (the EOS separating packed
    documents) are kept, and a leading BOS is dropped when the tokenizer adds one itself (it would be doubled).

    Args:
        dataset (`datasets.Dataset` or `datasets.IterableDataset`): packed samples with an `input_ids` column (the
            output of [`~hf_minitron.data.load_text_datasets`]), or a dataset that already has a `prompt` column
            (returned as it is).
        tokenizer (`PreTrainedTokenizerBase`): the student's (and teacher's) tokenizer.
        prompt_length (`int`): tokens per prompt.

    Returns:
        The dataset with a single `prompt` column.
    """
    columns = _columns(dataset)
    if "prompt" in columns:
        return dataset
    if "input_ids" not in columns:
        raise ValueError(
            f"train_dataset has columns {sorted(columns)}: on-policy distillation needs a 'prompt' column (text) or "
            "packed 'input_ids' to cut prompts from (hf_minitron.data.load_text_datasets makes them)."
        )
    bos = tokenizer.bos_token_id
    adds_bos = bos is not None and tokenizer("a")["input_ids"][:1] == [bos]

    def cut(sample):
        ids = list(sample["input_ids"])
        if adds_bos and ids[:1] == [bos]:
            ids = ids[1:]
        return {"prompt": tokenizer.decode(ids[:prompt_length], skip_special_tokens=False)}

    return dataset.map(cut, remove_columns=list(columns))


def _columns(dataset) -> set[str]:
    names = getattr(dataset, "column_names", None)
    return set(names) if names else set(next(iter(dataset)).keys())


def check_live_teacher(teacher, train_dataset=None) -> None:
    """Refuses a teacher cache (as `teacher` path or as `train_dataset`): the teacher must score the completions the
    student samples during training, which no cache of its outputs on the corpus holds."""
    from .teacher_cache import CACHE_INFO_NAME, is_teacher_cache

    cache_dir = isinstance(teacher, (str, os.PathLike)) and os.path.isfile(
        os.path.join(os.path.expanduser(teacher), CACHE_INFO_NAME)
    )
    if cache_dir or (train_dataset is not None and is_teacher_cache(train_dataset)):
        raise ValueError(
            "A teacher cache was given: on-policy distillation needs a live teacher, which scores the completions "
            "the student samples during training (a cache only holds the teacher's outputs on the corpus). Pass the "
            "teacher checkpoint as teacher and the packed text (or prompts) as train_dataset."
        )


def build_on_policy_trainer(student, teacher, args: OnPolicyConfig, train_dataset, processing_class, **kwargs):
    """TRL's [`~trl.DistillationTrainer`] for on-policy distillation of `student` from a live `teacher`.

    Everything that can be checked without running a model is checked first: the teacher is live (a teacher cache
    cannot score the student's own samples), both models share the vocabulary, the data yields prompts, and prompt +
    completion fit the student's positions.

    Args:
        student (`PreTrainedModel`): the model trained (e.g. the distilled student).
        teacher (`PreTrainedModel` or `str`): the teacher, or its checkpoint (loaded with
            `args.teacher_model_init_kwargs`).
        args ([`OnPolicyConfig`]): the training arguments.
        train_dataset (`datasets.Dataset`): packed samples (`input_ids`, prompts cut by [`prompts_from_samples`]) or a
            `prompt` column.
        processing_class (`PreTrainedTokenizerBase`): the shared tokenizer.
        **kwargs: passed to the trainer (`eval_dataset`, `callbacks`, `peft_config`, ...); an `eval_dataset` of
            packed samples is cut into prompts too.

    Returns:
        `trl.DistillationTrainer`, ready to `train()`.
    """
    from trl import DistillationTrainer

    check_live_teacher(teacher, train_dataset)
    if teacher is None:
        raise ValueError("teacher=None is invalid: pass the teacher model or its checkpoint path.")
    if isinstance(teacher, str):
        from ..embedded import resolve_model_path
        from ..validation import load_model_config

        teacher = resolve_model_path(teacher)
        teacher_config = load_model_config(teacher)
    else:
        teacher_config = teacher.config
    student_vocab = student.config.get_text_config().vocab_size
    teacher_vocab = teacher_config.get_text_config().vocab_size
    if student_vocab != teacher_vocab:
        raise ValueError(
            f"The student's vocab_size={student_vocab} differs from the teacher's vocab_size={teacher_vocab}: the "
            "on-policy loss compares the two next-token distributions token by token, so both must share the "
            "tokenizer. Distil from the teacher the student was pruned from."
        )
    # Prompts cut from packed samples are `prompt_length` tokens long; given prompts have lengths of their own.
    cut = "prompt" not in _columns(train_dataset)
    limit = getattr(student.config.get_text_config(), "max_position_embeddings", None)
    total = args.prompt_length + args.max_completion_length
    if cut and limit is not None and total > limit:
        raise ValueError(
            f"OnPolicyConfig.prompt_length + max_completion_length = {args.prompt_length} + "
            f"{args.max_completion_length} = {total} exceeds the student's max_position_embeddings={limit}: lower "
            "either so that prompt and completion fit."
        )
    train_dataset = prompts_from_samples(train_dataset, processing_class, args.prompt_length)
    if kwargs.get("eval_dataset") is not None:
        kwargs["eval_dataset"] = prompts_from_samples(kwargs["eval_dataset"], processing_class, args.prompt_length)
    return DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=train_dataset,
        processing_class=processing_class,
        **kwargs,
    )
