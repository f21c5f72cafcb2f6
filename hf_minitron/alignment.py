"""Alignment of the distilled student: SFT, then DPO / RPO, with TRL.

Paper 2 (https://arxiv.org/abs/2408.11796, §4 "Instruct models") aligns the distilled base models with NeMo-Aligner:
supervised fine-tuning on chat data, then preference optimisation. Here the same two stages run on TRL's stock
trainers ([`~trl.SFTTrainer`] and [`~trl.DPOTrainer`]) through two thin wrappers, [`run_sft`] and [`run_dpo`], that

- check the chat template up front (conversational data needs one; [`CHATML_TEMPLATE`] is offered as the default),
- merge LoRA adapters back into the weights (`merge_and_unload`), so the result is a stock checkpoint either way,
- save that checkpoint atomically on the main process (a crash never leaves a half-written model).
- resume an interrupted run: rerun with the same `output_dir` continues from its newest complete checkpoint.

[`build_sft_dataset`] and [`build_preference_dataset`] make small offline chat sets from the embedded Python reference
docs. They are toy data, deterministic and download-free, for the CPU recipes and the tests; use a real instruction /
preference set (e.g. `HuggingFaceH4/ultrachat_200k`, `HuggingFaceH4/ultrafeedback_binarized`) for a real model.

One module, past 500 lines: SFT and DPO / RPO share the loading, the chat template, the offline data and the atomic
final save; each trainer is one function.
"""

import copy
import json
import math
import os
import random
import re
from dataclasses import dataclass, field

from torch import nn
from trl import DPOConfig, SFTConfig

from .fingerprints import model_fingerprint
from .hub import keep_token_out_of_pickles
from .io import atomic_directory, check_not_overlapping, check_output_dir, resume_checkpoint
from .output_lock import output_locks
from .validation import check_finite_fields, check_finite_weights, check_numbers


# ChatML, the format of SmolLM2 / Qwen instruct models, with `{% generation %}` markers around each assistant turn
# (its `<|im_end|>` included) so that TRL's `assistant_only_loss=True` can mask everything else.
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{%- generation %}{{- message['content'] + '<|im_end|>' }}{%- endgeneration %}{{- '\n' }}"
    "{%- else %}{{- message['content'] + '<|im_end|>\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)

_SPLITS = ("train", "validation")
_UNDERLINE = re.compile(r"^\s*[=*\-]{3,}\s*$")
_VERSION_NOTE = re.compile(r"^(New|Added|Changed|Deprecated) in version")


# ----------------------------------------------------------------------------------------------------- offline data
def _topics(split: str) -> list[tuple[str, list[str]]]:
    """`(title, paragraphs)` of the embedded reference topics of `split`, deduplicated, in a fixed order."""
    from .data import load_embedded_corpus

    if split not in _SPLITS:
        raise ValueError(f"split={split!r} is invalid: use one of {list(_SPLITS)}.")
    topics, seen = [], set()
    for doc in load_embedded_corpus()[split]:
        if doc in seen:  # several pydoc keys ("if", "else") share one page
            continue
        seen.add(doc)
        title, _, body = doc.partition("\n")
        body = body.lstrip("*").strip()
        paragraphs = []
        for block in re.split(r"\n\s*\n", body):
            lines = block.splitlines()
            # Drop sub-headings (a line underlined with "=" / "-" / "*") and version notes: not answers to a question.
            lines = [
                line
                for i, line in enumerate(lines)
                if not _UNDERLINE.match(line) and not (i + 1 < len(lines) and _UNDERLINE.match(lines[i + 1]))
            ]
            if not lines or _VERSION_NOTE.match(lines[0].strip()):
                continue
            # Prose is hard-wrapped at 70 columns: unwrap it. Indented blocks are grammar or code: keep their lines.
            if lines[0].startswith(" "):
                paragraphs.append("\n".join(line.rstrip() for line in lines))
            else:
                paragraphs.append(" ".join(line.strip() for line in lines))
        topics.append((title.strip(), paragraphs))
    return topics


def _sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?:])\s+", text) if s]


def _passage(paragraphs: list[str], max_chars: int, start: int = 0) -> str:
    """Whole paragraphs from `start` while they fit in `max_chars`; a too-long first one is cut at a sentence end."""
    out: list[str] = []
    for paragraph in paragraphs[start:]:
        if out and len("\n\n".join([*out, paragraph])) > max_chars:
            break
        out.append(paragraph)
    text = "\n\n".join(out)
    if len(text) > max_chars:
        ends = [m.end() for m in re.finditer(r"[.!?:](?=\s)", text) if m.end() <= max_chars]
        text = text[: ends[-1]] if ends else text[:max_chars].rsplit(" ", 1)[0]
    return text


def _lower_first(title: str) -> str:
    # "The "assert" statement" -> "the "assert" statement", but keep acronyms and names ("pdb", "UTF").
    return title[0].lower() + title[1:] if title[:1].isupper() and not title[1:2].isupper() else title


def _question(title: str, index: int) -> str:
    if index % 2 == 0:
        return f"Explain {_lower_first(title)} in Python."
    return f'What does the Python language reference say in its section "{title}"?'


def _check_build_args(split: str, max_samples: int | None, max_answer_chars: int) -> None:
    if split not in _SPLITS:
        raise ValueError(f"split={split!r} is invalid: use one of {list(_SPLITS)}.")
    if max_samples is not None and max_samples <= 0:
        raise ValueError(f"max_samples={max_samples!r} is invalid: use a positive number, or None for every topic.")
    if max_answer_chars < 80:
        raise ValueError(
            f"max_answer_chars={max_answer_chars!r} is invalid: use at least 80 so that an answer holds a sentence."
        )


def build_sft_dataset(split: str = "train", max_samples: int | None = None, max_answer_chars: int = 600):
    """A small offline instruction set in TRL's conversational format (a `messages` column).

    One conversation per topic of the embedded Python reference docs (`pydoc_data.topics`, split as in
    [`~hf_minitron.data.load_embedded_corpus`]), cycling through three kinds of request:

    - "Explain the "assert" statement in Python." → the first paragraph(s) of that topic;
    - "What does the Python language reference say in its section "…"?" → the same;
    - "What does this passage describe?" with a later passage of the topic → the section it comes from and its gist.

    This is toy data, deterministic and built without a download, for the CPU recipe and the tests. It teaches a chat
    format, not knowledge a real assistant needs.

    Args:
        split (`str`, *optional*, defaults to `"train"`): `"train"` or `"validation"` (disjoint topics).
        max_samples (`int`, *optional*): Keep the first `max_samples` conversations.
        max_answer_chars (`int`, *optional*, defaults to `600`): Length cap of an answer, cut at paragraph or
            sentence boundaries.

    Returns:
        `datasets.Dataset` with a `messages` column: `[{"role": "user", ...}, {"role": "assistant", ...}]`.
    """
    from datasets import Dataset

    _check_build_args(split, max_samples, max_answer_chars)
    rows = []
    for i, (title, paragraphs) in enumerate(_topics(split)):
        answer = _passage(paragraphs, max_answer_chars)
        used = answer.count("\n\n") + 1  # paragraphs in the answer: the excerpt starts after them
        prose = [p for p in paragraphs[:used] if not p.startswith(" ")]
        if i % 3 == 2 and len(paragraphs) > used and prose:
            excerpt = _passage(paragraphs, max_answer_chars, start=used)
            question = f"What does this passage describe?\n\n{excerpt}"
            answer = f'It comes from the Python language reference section "{title}". {_sentences(prose[0])[0]}'
        else:
            question = _question(title, i)
        rows.append({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]})
        if max_samples is not None and len(rows) >= max_samples:
            break
    return Dataset.from_list(rows)


def build_preference_dataset(
    split: str = "train", max_samples: int | None = None, max_answer_chars: int = 600, seed: int = 0
):
    """A small offline preference set in TRL's conversational format (`prompt`, `chosen`, `rejected`).

    The prompt asks about one topic of the embedded Python reference docs; `chosen` is that topic's first
    paragraph(s); `rejected` cycles through three kinds of worse answer:

    - the passage of another topic (half the list away, so unrelated);
    - the correct passage with its sentences shuffled (a seeded `random.Random`), or another topic's passage if it
      has a single sentence;
    - the correct passage cut off in the middle (half its words).

    Toy data, deterministic and built without a download, for the CPU recipe and the tests.

    Args:
        split (`str`, *optional*, defaults to `"train"`): `"train"` or `"validation"`.
        max_samples (`int`, *optional*): Keep the first `max_samples` pairs.
        max_answer_chars (`int`, *optional*, defaults to `600`): Length cap of an answer.
        seed (`int`, *optional*, defaults to `0`): Seed of the sentence shuffles.

    Returns:
        `datasets.Dataset` with `prompt` (`[{"role": "user", ...}]`), `chosen` and `rejected`
        (`[{"role": "assistant", ...}]`) columns.
    """
    from datasets import Dataset

    _check_build_args(split, max_samples, max_answer_chars)
    topics = _topics(split)
    answers = [_passage(paragraphs, max_answer_chars) for _, paragraphs in topics]
    rows = []
    for i, (title, _) in enumerate(topics):
        chosen = answers[i]
        other = answers[(i + max(1, len(topics) // 2)) % len(topics)]
        sentences = _sentences(chosen)
        if i % 3 == 1 and len(sentences) > 1:
            shuffled = sentences[:]
            rng = random.Random(seed * 100_003 + i)
            while shuffled == sentences:
                rng.shuffle(shuffled)
            rejected = " ".join(shuffled)
        elif i % 3 == 2 and len(chosen.split()) > 3:
            rejected = chosen[: len(chosen) // 2].rsplit(" ", 1)[0]
        else:
            rejected = other
        if rejected == chosen:  # a one-topic split: nothing else to contrast with
            rejected = chosen[: len(chosen) // 2]
        rows.append(
            {
                "prompt": [{"role": "user", "content": _question(title, i)}],
                "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": rejected}],
            }
        )
        if max_samples is not None and len(rows) >= max_samples:
            break
    return Dataset.from_list(rows)


# ------------------------------------------------------------------------------------------------------ RPO config
@dataclass
class RPOConfig(DPOConfig):
    r"""[`~trl.DPOConfig`] plus `rpo_alpha`: DPO regularised by the negative log-likelihood of the chosen answers.

    `loss = dpo_loss + rpo_alpha * nll(chosen)`, the "RPO" of [Pang et al. 2024](https://arxiv.org/abs/2404.19733)
    that TRL < 1.0 exposed as `DPOConfig.rpo_alpha`. TRL 1.x expresses it as `loss_type=[..., "sft"]` with
    `loss_weights=[..., rpo_alpha]`; this config does that mapping, so recipes keep the familiar field.

    Paper 2 aligns with NeMo-Aligner's *reward-aware* preference optimisation (Nemotron-4 340B,
    https://arxiv.org/abs/2406.11704), which regresses the implicit reward gap onto reward-model scores. Without a
    reward model (none is available offline), the NLL-regularised DPO above is the usual stand-in: it too keeps the
    chosen answers likely while pushing the rejected ones down.

    Args:
        rpo_alpha (`float`, *optional*):
            Weight of the NLL term on the chosen completions. `None` (default) is plain DPO; Pang et al. use
            `1.0`.
    """

    rpo_alpha: float | None = field(
        default=None,
        metadata={"help": "Weight of the NLL loss on chosen completions added to the DPO loss (None: plain DPO)."},
    )

    def __post_init__(self):
        super().__post_init__()
        check_finite_fields(self)
        keep_token_out_of_pickles(self)  # checkpoints pickle these arguments (training_args.bin)
        if not 0 < self.beta < math.inf:
            raise ValueError(f"RPOConfig.beta={self.beta!r} is invalid: use a positive value (0.1 is TRL's default).")
        if self.rpo_alpha is None:
            return
        if not 0 <= self.rpo_alpha < math.inf:
            raise ValueError(
                f"RPOConfig.rpo_alpha={self.rpo_alpha!r} is invalid: use a non-negative weight (e.g. 1.0), or None "
                "for plain DPO."
            )
        weights = list(self.loss_weights) if self.loss_weights is not None else [1.0] * len(self.loss_type)
        if "sft" in self.loss_type:
            # Re-running __post_init__ (e.g. RPOConfig(**config.to_dict())) finds the term this mapping added.
            weight = weights[self.loss_type.index("sft")]
            if weight != self.rpo_alpha:
                raise ValueError(
                    f"RPOConfig.rpo_alpha={self.rpo_alpha!r} conflicts with loss_type={self.loss_type!r}, which "
                    f"already has an 'sft' term of weight {weight}: set one or the other."
                )
            return
        self.loss_type = [*self.loss_type, "sft"]
        self.loss_weights = [*weights, float(self.rpo_alpha)]


# ------------------------------------------------------------------------------------------------------ the trainers
def _load(model, tokenizer, args):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if isinstance(model, str):
        from .embedded import resolve_model_path

        path = resolve_model_path(model)
        kwargs = dict(args.model_init_kwargs or {})
        # Explicit, so that transformers never asks on stdin whether to run a checkpoint's own code.
        trust_remote_code = bool(kwargs.pop("trust_remote_code", False))
        model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=trust_remote_code, **kwargs)
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer is None:
        raise ValueError(
            "tokenizer=None is invalid with an instantiated model: pass its tokenizer (it formats the chats and is "
            "saved with the aligned checkpoint)."
        )
    return model, tokenizer


def _prepare(model, tokenizer, args, final_model_dir: str | None):
    """What SFT and DPO do first: every check that needs no model, then the model loaded. Returns the model, the
    tokenizer, the source's fingerprint (recorded with the checkpoints: a resume from another model is refused) and
    the final folder."""
    check_finite_fields(args)  # a NaN learning rate would train silently into an all-NaN model
    keep_token_out_of_pickles(args)  # checkpoints pickle these arguments (training_args.bin)
    final_model_dir = final_model_dir or os.path.join(args.output_dir, "final")
    _check_outputs(model, args, final_model_dir)
    check_numbers(args)  # steps, batch sizes, learning rate in range, before the model is loaded
    source = model_fingerprint(model)
    model, tokenizer = _load(model, tokenizer, args)
    return model, tokenizer, source, final_model_dir


def _check_outputs(model, args, final_model_dir: str) -> None:
    """Before any weights are loaded: the result can be written, and neither it nor the checkpoints land in (or
    around) the input model's folder."""
    from .embedded import resolve_model_path

    source = resolve_model_path(model) if isinstance(model, str) else None
    check_output_dir(final_model_dir, overwrite=True, sources=[source])
    check_not_overlapping(args.output_dir, source, "the input model")


def _prepare_chat_template(tokenizer, dataset, chat_template: str | None, needs: str) -> None:
    """Sets `chat_template` on the tokenizer, or checks that conversational data finds one there."""
    from trl.data_utils import is_conversational

    if chat_template is not None:
        if chat_template == "chatml":
            chat_template = CHATML_TEMPLATE
        elif chat_template.endswith((".jinja", ".j2")) and os.path.isfile(chat_template):
            with open(chat_template, encoding="utf-8") as f:
                chat_template = f.read()
        elif "{" not in chat_template:
            raise ValueError(
                f"chat_template={chat_template!r} is invalid: pass a Jinja template string, a path to a .jinja file, "
                "or 'chatml' for hf_minitron.alignment.CHATML_TEMPLATE."
            )
        tokenizer.chat_template = chat_template
    elif is_conversational(next(iter(dataset))) and not tokenizer.chat_template:
        # Base (pre-trained, then pruned and distilled) models usually ship no template; guessing one would silently
        # decide the model's chat format.
        raise ValueError(
            f"chat_template=None is invalid here: the {needs} dataset is conversational and the tokenizer has no chat "
            "template. Pass chat_template='chatml' (hf_minitron.alignment.CHATML_TEMPLATE), a Jinja string or a "
            ".jinja path, or set tokenizer.chat_template."
        )


def _check_columns(dataset, required: tuple[str, ...], name: str) -> None:
    columns = set(dataset.column_names or next(iter(dataset)).keys())
    if not any(column in columns for column in required):
        raise ValueError(
            f"train_dataset has columns {sorted(columns)}, which {name} cannot use: provide one of {list(required)} "
            "(see hf_minitron.alignment.build_sft_dataset / build_preference_dataset for the formats)."
        )


def _save_final(trainer, tokenizer, final_model_dir: str, merge: bool) -> nn.Module:
    """Writes the stock checkpoint (LoRA merged) plus `log_history.json`, atomically, on the main process."""
    accelerator = trainer.accelerator
    # keep_fp32_wrapper=False: TRL configs default to bf16, and the returned model must not keep accelerate's
    # autocast-wrapped forward (its logits would differ from the saved checkpoint's).
    if merge:
        # The adapter update is folded into the base weights: the result loads with AutoModelForCausalLM, no PEFT.
        model = accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False).merge_and_unload()
        state_dict = None
    else:
        model = accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
        # A collective: every process takes part in gathering FSDP / ZeRO-3 shards (a plain state_dict otherwise).
        state_dict = accelerator.get_state_dict(trainer.model)
    if accelerator.is_main_process:
        with atomic_directory(final_model_dir, overwrite=True) as tmp:
            model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
            check_finite_weights(tmp)
            tokenizer.save_pretrained(tmp)
            (tmp / "log_history.json").write_text(json.dumps(trainer.state.log_history, indent=1))
    accelerator.wait_for_everyone()
    return model


def run_sft(
    model: nn.Module | str,
    tokenizer,
    train_dataset,
    args: SFTConfig,
    peft_config=None,
    eval_dataset=None,
    chat_template: str | None = None,
    final_model_dir: str | None = None,
    callbacks=None,
) -> nn.Module:
    """Supervised fine-tuning with [`~trl.SFTTrainer`]; writes a stock checkpoint (paper 2, §4).

    Args:
        model (`PreTrainedModel` or `str`): The distilled student, or its checkpoint path (`"embedded"` works), loaded
            with `args.model_init_kwargs`.
        tokenizer (`PreTrainedTokenizerBase`, *optional* when `model` is a path): Formats the chats; saved with the
            result (with the chat template used). Its `chat_template` / `pad_token` may be set in place.
        train_dataset (`datasets.Dataset`): Any dataset TRL's SFT accepts: conversational (`messages`, or `prompt` /
            `completion` lists of messages), prompt-completion or plain `text`. See [`build_sft_dataset`].
        args ([`~trl.SFTConfig`]): Training arguments (`max_length`, `assistant_only_loss`, `packing`, ...).
        peft_config ([`~peft.LoraConfig`], *optional*): Train LoRA adapters; they are merged into the weights
            (`merge_and_unload`) before saving.
        eval_dataset (`datasets.Dataset`, *optional*): Held-out data, same format.
        chat_template (`str`, *optional*): A Jinja template, a `.jinja` path, or `"chatml"` for [`CHATML_TEMPLATE`],
            set on the tokenizer. By default the tokenizer's own is used; conversational data without one raises a
            `ValueError` (no format is guessed).
        final_model_dir (`str`, *optional*, defaults to `{args.output_dir}/final`): Where the result is written.
        callbacks (`list[TrainerCallback]`, *optional*): Trainer callbacks.

    Returns:
        `PreTrainedModel`: the fine-tuned model (adapters merged), also saved (safetensors, tokenizer,
        `log_history.json`) to `final_model_dir` by the main process, atomically.

    Holds the output lock of every folder it writes (one writer per folder, see `output_lock.py`).
    """
    with output_locks(args.output_dir, final_model_dir or os.path.join(args.output_dir, "final")):
        return _run_sft(
            model, tokenizer, train_dataset, args, peft_config, eval_dataset, chat_template, final_model_dir, callbacks
        )


def _run_sft(
    model: nn.Module | str,
    tokenizer,
    train_dataset,
    args: SFTConfig,
    peft_config=None,
    eval_dataset=None,
    chat_template: str | None = None,
    final_model_dir: str | None = None,
    callbacks=None,
) -> nn.Module:
    from trl import SFTTrainer

    model, tokenizer, source, final_model_dir = _prepare(model, tokenizer, args, final_model_dir)
    _check_columns(train_dataset, ("messages", "text", "prompt", "input_ids"), "SFT")
    _prepare_chat_template(tokenizer, train_dataset, chat_template, "SFT")
    if args.assistant_only_loss:
        from trl.chat_template_utils import get_training_chat_template, has_generation_markers

        if tokenizer.chat_template and not has_generation_markers(tokenizer.chat_template):
            try:
                get_training_chat_template(tokenizer)
            except ValueError:
                raise ValueError(
                    "assistant_only_loss=True needs a chat template with {% generation %} markers, and TRL has no "
                    "training variant of this tokenizer's template: pass chat_template='chatml' (which has them) or "
                    "set assistant_only_loss=False."
                ) from None
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=callbacks,
    )
    # Rerunning the same command after an interruption continues from the newest complete checkpoint.
    trainer.train(resume_from_checkpoint=resume_checkpoint(args, {"model": source}))
    return _save_final(trainer, tokenizer, final_model_dir, merge=peft_config is not None)


def run_dpo(
    model: nn.Module | str,
    tokenizer,
    train_dataset,
    args: DPOConfig,
    peft_config=None,
    ref_model: nn.Module | None = None,
    eval_dataset=None,
    chat_template: str | None = None,
    final_model_dir: str | None = None,
    callbacks=None,
) -> nn.Module:
    """Preference optimisation with [`~trl.DPOTrainer`]; writes a stock checkpoint (paper 2, §4).

    Pass an [`RPOConfig`] with `rpo_alpha` for DPO + NLL on the chosen answers, or any [`~trl.DPOConfig`]
    (`beta`, `loss_type`, `precompute_ref_log_probs`, ...).

    Args:
        model (`PreTrainedModel` or `str`): The SFT model, or its checkpoint path.
        tokenizer (`PreTrainedTokenizerBase`, *optional* when `model` is a path): As in [`run_sft`].
        train_dataset (`datasets.Dataset`): Preference pairs: `prompt`, `chosen`, `rejected` (conversational or
            plain text), or `chosen` / `rejected` only (implicit prompt). See [`build_preference_dataset`].
        args ([`~trl.DPOConfig`] or [`RPOConfig`]): Training arguments.
        peft_config ([`~peft.LoraConfig`], *optional*): Train LoRA adapters, merged before saving. The reference is
            then the model with its adapters disabled, so no copy is made.
        ref_model (`PreTrainedModel`, *optional*): The frozen reference policy. By default, without LoRA and without
            `precompute_ref_log_probs`, a frozen copy of `model` as it is before training (TRL would otherwise reload
            it from `model.config._name_or_path`, which an in-memory pruned model does not have).
        eval_dataset (`datasets.Dataset`, *optional*): Held-out pairs.
        chat_template (`str`, *optional*): As in [`run_sft`].
        final_model_dir (`str`, *optional*, defaults to `{args.output_dir}/final`): Where the result is written.
        callbacks (`list[TrainerCallback]`, *optional*): Trainer callbacks.

    Returns:
        `PreTrainedModel`: the aligned model (adapters merged), also saved to `final_model_dir` by the main process,
        atomically.

    Holds the output lock of every folder it writes (one writer per folder, see `output_lock.py`).
    """
    with output_locks(args.output_dir, final_model_dir or os.path.join(args.output_dir, "final")):
        return _run_dpo(
            model,
            tokenizer,
            train_dataset,
            args,
            peft_config,
            ref_model,
            eval_dataset,
            chat_template,
            final_model_dir,
            callbacks,
        )


def _run_dpo(
    model: nn.Module | str,
    tokenizer,
    train_dataset,
    args: DPOConfig,
    peft_config=None,
    ref_model: nn.Module | None = None,
    eval_dataset=None,
    chat_template: str | None = None,
    final_model_dir: str | None = None,
    callbacks=None,
) -> nn.Module:
    from trl import DPOTrainer

    model, tokenizer, source, final_model_dir = _prepare(model, tokenizer, args, final_model_dir)
    _check_columns(train_dataset, ("chosen",), "DPO")
    if "rejected" not in (train_dataset.column_names or ()):
        raise ValueError(
            f"train_dataset has columns {train_dataset.column_names}, without 'rejected': DPO needs 'chosen' and "
            "'rejected' (and usually 'prompt') columns."
        )
    _prepare_chat_template(tokenizer, train_dataset, chat_template, "DPO")
    if ref_model is None and peft_config is None and not args.precompute_ref_log_probs:
        ref_model = copy.deepcopy(model)
    if ref_model is not None:
        ref_model.eval().requires_grad_(False)
    trainer = DPOTrainer(
        model=model,
        ref_model=ref_model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=callbacks,
    )
    if len(trainer.train_dataset) == 0:
        # TRL drops pairs whose prompt alone fills max_length; torch would only say "num_samples=0".
        raise ValueError(
            f"DPOConfig.max_length={args.max_length} is too small: every prompt of train_dataset fills it, so no pair "
            "is left to train on. Raise max_length or shorten the prompts."
        )
    # Rerunning the same command after an interruption continues from the newest complete checkpoint.
    trainer.train(resume_from_checkpoint=resume_checkpoint(args, {"model": source}))
    return _save_final(trainer, tokenizer, final_model_dir, merge=peft_config is not None)
