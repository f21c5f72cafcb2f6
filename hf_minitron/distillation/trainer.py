"""`DistillationTrainer`: Minitron knowledge distillation as a `transformers.Trainer`.

The student is trained to match a frozen teacher's next-token distributions (paper 1 §2.4,
https://arxiv.org/abs/2407.14679), optionally with a cross-entropy term and an intermediate-state loss. With the fused
loss (the default), neither model runs its `lm_head` on the whole batch: a forward pre-hook on each `lm_head` takes the
final (post-norm) hidden states and hands the `lm_head` an empty slice, and [`fused_kd_loss`] computes the loss chunk
by chunk from the hidden states and the `lm_head` weights. The hook runs inside each model's forward, so the weights it
sees are gathered under FSDP2 / ZeRO-3 and the gradients flow through the ordinary parameters.

One module, past 500 lines: the trainer's hooks, its teacher placement and its checkpoint hooks for the projection of
intermediate states belong to one `Trainer` subclass; `compute_loss` itself is one screen, one method per step.
"""

import contextlib
import math
import os
from collections import defaultdict
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM, Trainer
from transformers.utils import logging

from ..architectures import get_decoder_layers
from ..embedded import resolve_model_path
from ..validation import NonFiniteError, check_checkpoint, check_process_group, check_same_tokenizer
from .config import DistillationConfig
from .losses import KDLossOptions, intermediate_state_loss
from .teacher_cache import TEACHER_COLUMNS, CachedTeacher, collate_teacher_columns, is_teacher_cache
from .teachers import LiveTeacher, ShardedTeacher, Teacher, TeacherOutput, _HeadCapture, _is_sharded


logger = logging.get_logger(__name__)

# Name of the student submodule holding the intermediate-state projection: kept in checkpoints (so that
# `resume_from_checkpoint` restores it) and dropped from the final `save_model` output.
PROJECTION_NAME = "minitron_projection"
# A PEFT checkpoint holds the adapter only: the projection trained with it is saved next to it in this file.
PROJECTION_WEIGHTS_NAME = "minitron_projection.safetensors"


@dataclass
class DataCollatorForDistillation:
    """Right-pads `input_ids` / `attention_mask` and builds causal-LM `labels` (padding -> `-100`) when absent.

    Unlike `DataCollatorForLanguageModeling`, it masks by `attention_mask`, not by token id, so EOS separators inside
    packed samples stay targets even when `pad_token_id == eos_token_id`.
    """

    pad_token_id: int = 0

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        ids = [torch.as_tensor(f["input_ids"], dtype=torch.long) for f in features]
        masks = [
            torch.as_tensor(f["attention_mask"], dtype=torch.long) if "attention_mask" in f else torch.ones_like(i)
            for i, f in zip(ids, features)
        ]
        length = max(len(i) for i in ids)
        batch = {
            "input_ids": torch.full((len(ids), length), self.pad_token_id, dtype=torch.long),
            "attention_mask": torch.zeros((len(ids), length), dtype=torch.long),
            "labels": torch.full((len(ids), length), -100, dtype=torch.long),
        }
        for row, (i, m, f) in enumerate(zip(ids, masks, features)):
            batch["input_ids"][row, : len(i)] = i
            batch["attention_mask"][row, : len(i)] = m
            labels = torch.as_tensor(f["labels"], dtype=torch.long) if "labels" in f else i.masked_fill(m == 0, -100)
            batch["labels"][row, : len(i)] = labels
        batch.update(collate_teacher_columns(features, length))  # a teacher cache's columns, padded alike
        return batch


def shard_teacher(teacher: nn.Module, device: torch.device | str, mp_policy=None, mesh=None) -> nn.Module:
    """Shards a frozen teacher with FSDP2 (`fully_shard`) over the processes of `mesh` (default: all of them).

    Layer by layer, then the root, so that a forward gathers one decoder layer at a time and each process holds
    1/world_size of the teacher between forwards (trl#2580: TRL's GKD trainer kept a full teacher copy per rank under
    FSDP). The root group holds the embedding, final norm and lm_head, so the lm_head pre-hook of the fused loss sees
    the gathered weight. Works on GPUs (NCCL) and on CPUs (gloo).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kwargs = {"mp_policy": mp_policy or MixedPrecisionPolicy(), "reshard_after_forward": True}
    if mesh is not None:
        kwargs["mesh"] = mesh
    teacher.to(device)
    for layer in get_decoder_layers(teacher):
        fully_shard(layer, **kwargs)
    fully_shard(teacher, **kwargs)
    return teacher.eval()


def _path_tokenizer(name_or_path: str, trust_remote_code: bool):
    """The tokenizer saved with a checkpoint, or `None` when a local checkpoint holds none."""
    from transformers import AutoTokenizer

    path = resolve_model_path(name_or_path)
    if os.path.isdir(path) and not any(
        os.path.isfile(os.path.join(path, name)) for name in ("tokenizer_config.json", "tokenizer.json")
    ):
        logger.warning(f"{name_or_path} holds no tokenizer: cannot check that it matches the other model's.")
        return None
    return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)


def _unwrap_peft(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "peft_config") else model


class StopOnNonFinite:
    """Trainer mixin: stops training with a `NonFiniteError` at the first optimizer step whose loss or gradient norm is
    NaN or infinite, before that update is applied (so no later checkpoint or final model is made from it).

    One check per optimizer step: each micro-batch's loss is folded into a flag on the device (no sync), read together
    with the gradient norm the Trainer computes at every step anyway (`_get_grad_norm`); with several processes the
    flags are summed, so that every process stops at the same step.
    """

    _nonfinite_loss = None

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        bad = ~torch.isfinite(loss.detach()).all()
        self._nonfinite_loss = bad if self._nonfinite_loss is None else self._nonfinite_loss | bad
        return loss

    def _get_grad_norm(self, model, grad_norm=None):
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        # `.item()` as the Trainer's own logging does: the norm may be a DTensor (FSDP2) or a float (DeepSpeed).
        norm = grad_norm.item() if hasattr(grad_norm, "item") else grad_norm
        bad_loss = self._nonfinite_loss is not None and bool(self._nonfinite_loss)
        self._nonfinite_loss = None
        bad_norm = norm is not None and not math.isfinite(norm)
        flags = torch.tensor([bad_norm, bad_loss], dtype=torch.float32, device=self.accelerator.device)
        if self.accelerator.num_processes > 1:
            flags = self.accelerator.reduce(flags, reduction="sum")
        bad_norm, bad_loss = (value > 0 for value in flags.tolist())
        if bad_norm or bad_loss:
            what = "loss" if bad_loss else "gradient norm"
            raise NonFiniteError(
                f"Training stopped at step {self.state.global_step + 1}: the {what} is NaN or infinite, so that update "
                "was not applied and no model is saved from it. Usual causes: a learning rate too high, float16 "
                "overflow (train in bfloat16 or float32), or a broken teacher or batch. Checkpoints already in "
                f"{self.args.output_dir!r} are from before; fix the cause and rerun to resume from the newest, or use "
                "a new output_dir to start afresh."
            )
        return grad_norm


class DistillationTrainer(StopOnNonFinite, Trainer):
    """Trainer for Minitron knowledge distillation of a (pruned) student from a frozen teacher.

    Args:
        model (`PreTrainedModel`, `PeftModel` or `str`):
            The student (a model, or a checkpoint path loaded with `AutoModelForCausalLM.from_pretrained`).
        teacher_model (`PreTrainedModel` or `str`, *optional*):
            The teacher, or its checkpoint path; defaults to `args.teacher_model_name_or_path`. It is frozen, kept in
            `eval()` mode, run under `no_grad`, and prepared by the accelerator for evaluation: replicated under
            DDP, sharded under FSDP / DeepSpeed ZeRO-3.
        args ([`DistillationConfig`]): Training and distillation arguments.
        data_collator (*optional*): Defaults to [`DataCollatorForDistillation`], which builds causal-LM labels.
        train_dataset, eval_dataset, processing_class, callbacks, optimizers, compute_metrics:
            As in [`~transformers.Trainer`]. `processing_class` (the tokenizer) is also used to check that a teacher
            with a larger (padded) vocabulary shares the student's tokenizer.

    Logged metrics: `loss` (the objective, per target token), `kd_loss`, `ce_loss`, `is_loss` and
    `is_loss_weight` (alpha); at evaluation `eval_loss` is the student's cross-entropy on the held-out data,
    with `eval_perplexity` and `eval_kd_loss`.

    Attributes:
        teacher ([`~teachers.Teacher`]): The teacher as `compute_loss` uses it: live, sharded or a teacher cache.
        loss_options ([`KDLossOptions`]): The logit-loss settings of `args`, with both models' soft-capping.
    """

    _tag_names = ["hf-minitron", "distillation"]
    # compute_loss divides by the token count of the whole accumulated batch itself.
    loss_is_scaled_for_ga = True

    def __init__(
        self,
        model: nn.Module | str,
        teacher_model: nn.Module | str | None = None,
        args: DistillationConfig | None = None,
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        callbacks=None,
        optimizers=(None, None),
        compute_metrics=None,
    ):
        if args is None:
            args = DistillationConfig(output_dir="distillation_output")
        elif not isinstance(args, DistillationConfig):
            raise ValueError(
                f"DistillationTrainer needs a DistillationConfig, got {type(args).__name__}: build the arguments "
                "with `DistillationConfig(...)` (it accepts every TrainingArguments field)."
            )
        check_process_group(args)
        teacher_model = teacher_model if teacher_model is not None else args.teacher_model_name_or_path
        # A teacher cache as train_dataset stands in for the teacher (hf_minitron.distillation.teacher_cache): none is loaded.
        self.teacher_cache = CachedTeacher.from_dataset(train_dataset) if is_teacher_cache(train_dataset) else None
        if self.teacher_cache is not None and teacher_model is not None:
            raise ValueError(
                f"DistillationTrainer got both a teacher and a teacher cache as train_dataset ({self.teacher_cache}): "
                "drop teacher_model (and teacher_model_name_or_path) to distil from the cache, or pass the plain "
                "tokenized data to distil from the live teacher."
            )
        if teacher_model is None and self.teacher_cache is None:
            raise ValueError(
                "DistillationTrainer has no teacher: pass `teacher_model=` (a model or a checkpoint path) or set "
                "DistillationConfig.teacher_model_name_or_path."
            )
        # Both checkpoints on disk are checked before either is loaded: a bad teacher path must not cost a student load.
        for name in (model, teacher_model):
            if isinstance(name, str):
                check_checkpoint(resolve_model_path(name))
        if isinstance(teacher_model, str):
            # A teacher given by path brings its own tokenizer: logit KD compares ids, so it must be the student's.
            trust = bool((args.teacher_model_init_kwargs or {}).get("trust_remote_code", False))
            teacher_tokenizer = _path_tokenizer(teacher_model, trust)
            student_tokenizer = getattr(processing_class, "tokenizer", processing_class)
            if student_tokenizer is None and isinstance(model, str):
                student_tokenizer = _path_tokenizer(model, False)
            if teacher_tokenizer is not None and hasattr(student_tokenizer, "get_vocab"):
                student_name = model if isinstance(model, str) else "the student"
                check_same_tokenizer(student_tokenizer, teacher_tokenizer, student_name, teacher_model)
        if isinstance(model, str):
            model = AutoModelForCausalLM.from_pretrained(
                resolve_model_path(model), use_safetensors=True, trust_remote_code=False
            )
        if isinstance(teacher_model, str):
            teacher_model = self._load_teacher(teacher_model, args)
        elif args.teacher_model_init_kwargs:
            raise ValueError(
                "DistillationConfig.teacher_model_init_kwargs is set but the teacher is already a model: pass its "
                "path as `teacher_model` (or teacher_model_name_or_path) to use the kwargs, or drop them."
            )
        _check_student(model, teacher_model, args)
        if self.teacher_cache is not None:
            student_vocab = _unwrap_peft(model).get_output_embeddings().weight.shape[0]
            self.teacher_cache.check(student_vocab, args, processing_class)
        else:
            teacher_model.eval()
            teacher_model.requires_grad_(False)
            self._check_compatibility(model, teacher_model, args, processing_class)
        student_hidden = _unwrap_peft(model).config.get_text_config().hidden_size
        teacher_config = None if teacher_model is None else teacher_model.config.get_text_config()
        teacher_hidden = student_hidden if teacher_config is None else teacher_config.hidden_size
        if args.intermediate_layer_mapping and student_hidden != teacher_hidden:
            # One projection shared by all layer pairs (paper 1 §2.4), trained with the student: as a submodule it is
            # wrapped by DDP/FSDP with the student, optimised with it and stored in its checkpoints.
            weight = next(model.parameters())
            # Seeded by args.seed, not by whatever the global RNG holds: the same command must give the same run.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(args.seed)
                projection = nn.Linear(student_hidden, teacher_hidden, bias=False)
            model.add_module(PROJECTION_NAME, projection.to(weight.device, weight.dtype))

        if data_collator is None:
            pad = getattr(processing_class, "pad_token_id", None)
            data_collator = DataCollatorForDistillation(pad_token_id=pad if pad is not None else 0)
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            callbacks=callbacks,
            optimizers=optimizers,
            compute_metrics=compute_metrics,
        )
        # The base Trainer counts target tokens over the accumulated (and, with average_tokens_across_devices,
        # all-device) batch only for models that take loss kwargs; our compute_loss consumes that count.
        self.model_accepts_loss_kwargs = True
        if self.teacher_cache is not None:
            self.teacher_model = None
            self.teacher_cache.to(self.accelerator.device)
            self.teacher_placement = f"none loaded: distilling from the {self.teacher_cache}"
            self.teacher: Teacher = self.teacher_cache
        else:
            self.teacher_model = self._prepare_teacher(teacher_model)
            unwrapped = self.accelerator.unwrap_model(self.teacher_model)
            kind = ShardedTeacher if _is_sharded(unwrapped.get_output_embeddings().weight) else LiveTeacher
            self.teacher = kind(self.teacher_model, unwrapped)
        student_softcap = getattr(_unwrap_peft(model).config, "final_logit_softcapping", None)
        self.loss_options = KDLossOptions.from_config(args, student_softcap, self.teacher.softcap)
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        self._final_save = False

    # ------------------------------------------------------------------------------------------------ setup
    @staticmethod
    def _load_teacher(name_or_path: str, args: DistillationConfig) -> nn.Module:
        kwargs = dict(args.teacher_model_init_kwargs or {})
        kwargs.setdefault("use_safetensors", True)
        dtype = kwargs.get("dtype")
        if isinstance(dtype, str) and dtype != "auto":
            kwargs["dtype"] = getattr(torch, dtype)
        # Explicit, so that transformers never asks on stdin whether to run the checkpoint's own code.
        trust_remote_code = bool(kwargs.pop("trust_remote_code", False))
        return AutoModelForCausalLM.from_pretrained(
            resolve_model_path(name_or_path), trust_remote_code=trust_remote_code, **kwargs
        )

    @staticmethod
    def _check_compatibility(student, teacher, args, tokenizer):
        student_base = _unwrap_peft(student)
        student_vocab = student_base.get_output_embeddings().weight.shape[0]
        teacher_vocab = teacher.get_output_embeddings().weight.shape[0]
        if teacher_vocab != student_vocab:
            same_tokenizer = (
                tokenizer is not None and teacher_vocab > student_vocab and len(tokenizer) <= student_vocab
            )
            if not same_tokenizer:
                raise ValueError(
                    f"The teacher's vocabulary ({teacher_vocab} rows) differs from the student's ({student_vocab}) "
                    f"and the tokenizer ({'none given' if tokenizer is None else f'{len(tokenizer)} tokens'}) does not "
                    "show it is mere padding. Logit distillation needs a shared tokenizer: distil from a teacher with "
                    "the student's tokenizer, or pass `processing_class=` when the teacher's extra rows are padding."
                )
            logger.info(f"Teacher vocab padded to {teacher_vocab}: its logits are sliced to {student_vocab} tokens.")
        if args.intermediate_layer_mapping:
            student_layers = len(get_decoder_layers(student_base))
            teacher_layers = len(get_decoder_layers(teacher))
            for s, t in args.intermediate_layer_mapping:  # EMBEDDING_STATE (-1) is always in range
                if s >= student_layers or t >= teacher_layers:
                    raise ValueError(
                        f"DistillationConfig.intermediate_layer_mapping pair ({s}, {t}) is out of range: the student "
                        f"has {student_layers} layers (0..{student_layers - 1}) and the teacher {teacher_layers} "
                        f"(0..{teacher_layers - 1})."
                    )

    def _prepare_teacher(self, teacher: nn.Module) -> nn.Module:
        # `teacher_placement` says what was done, for the recipes' start-up line and for users checking a launch.
        processes = self.accelerator.num_processes
        if self.is_deepspeed_enabled:
            from trl.models.utils import prepare_deepspeed

            self.teacher_placement = f"partitioned with DeepSpeed ZeRO-3 over {processes} processes"
            return prepare_deepspeed(teacher, self.accelerator)  # ZeRO-3 partitions it like the student
        if self.is_fsdp_enabled and self.accelerator.state.fsdp_plugin.fsdp_version == 2:
            plugin = self.accelerator.state.fsdp_plugin
            self.teacher_placement = f"sharded with FSDP2 over {processes} processes"
            return shard_teacher(teacher, self.accelerator.device, plugin.mixed_precision_policy)
        if self.is_fsdp_enabled:
            from trl.models.utils import prepare_fsdp

            self.teacher_placement = f"sharded with FSDP over {processes} processes"
            return prepare_fsdp(teacher, self.accelerator)
        self.teacher_placement = f"replicated on {processes} processes" if processes > 1 else "one process"
        return self.accelerator.prepare_model(teacher, evaluation_mode=True).eval()

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        # A teacher cache's columns feed the loss, not the model's forward: `remove_unused_columns` must keep them.
        self._signature_columns += [name for name in TEACHER_COLUMNS if name not in self._signature_columns]

    # ------------------------------------------------------------------------------------------------ loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Weighted sum of the KD, CE and intermediate-state losses, divided by the number of target tokens.

        `num_items_in_batch` (target tokens of the whole accumulated, all-device batch, counted by the Trainer) makes
        gradient accumulation and data parallelism exact; without it the loss is the per-token mean of this batch.
        """
        inputs, columns, targets = _split_batch(inputs)
        mask = targets.ne(-100)
        student = _unwrap_peft(self.accelerator.unwrap_model(model))
        fused = self.args.use_fused_kd_loss and isinstance(student.get_output_embeddings(), nn.Linear)
        taught = self._run_teacher(inputs, columns, fused, model.training)
        fused = fused and taught is not None  # held-out data without teacher outputs: the student's CE only
        outputs, head_losses = self._student_forward(model, inputs, taught, targets, fused)
        if fused:
            logit_loss, metrics = self._fused_logit_loss(student, outputs, *head_losses["logit"])
        else:
            logit_loss, metrics = self._logit_loss(outputs, taught, targets)
        loss = logit_loss
        if self.args.router_aux_loss_coef is not None and model.training:
            loss = loss + self._router_loss(student, outputs, mask, metrics)
        if "is" in head_losses:
            loss = loss + self._intermediate_term(logit_loss, head_losses["is"], mask, metrics)
        loss = self._normalise(loss, mask, num_items_in_batch, model.training)
        # Per-token sums and the token count, averaged over the logging interval in `log`.
        mode = "train" if model.training else "eval"
        for key, value in metrics.items():
            self._metrics[mode][key].append(value.detach().float())
        self._metrics[mode]["tokens"].append(mask.sum().float())
        return (loss, outputs) if return_outputs else loss

    def _run_teacher(self, inputs: dict, columns: dict, fused: bool, training: bool) -> TeacherOutput | None:
        """The teacher's outputs for the batch, with the states of the mapped teacher layers."""
        layers = [t for _, t in self.args.intermediate_layer_mapping or []]
        taught = self.teacher.forward(inputs, columns, layers, fused)
        if taught is None and training:
            raise ValueError(f"A training batch has no teacher columns: train on the teacher cache ({self.teacher}).")
        return taught

    def _student_forward(self, model, inputs, taught, targets, fused):
        """The student's outputs, and `{"logit": fused (loss, kd_sum, ce_sum), "is": intermediate-state sum}` computed
        from its `lm_head` pre-hook, inside its forward (where FSDP2 / ZeRO-3 have gathered the weights they use)."""
        wrapper = self.accelerator.unwrap_model(model)
        layers = [s for s, _ in self.args.intermediate_layer_mapping or []]
        head_losses = {}
        on_head = partial(self._head_losses, head_losses, wrapper, taught, targets, fused)
        if self.args.router_aux_loss_coef is not None and model.training:
            inputs = {**inputs, "output_router_logits": True}
        with _HeadCapture(_unwrap_peft(wrapper), layers, on_head, skip_head=fused):
            return model(**inputs), head_losses

    def _head_losses(self, head_losses, wrapper, taught, targets, fused, head, hidden, states):
        """The student's `lm_head` pre-hook: the losses of its final hidden states and normed intermediate states."""
        if fused:
            head_losses["logit"] = self.teacher.fused_loss(taught, hidden, head, targets, self.loss_options)
        if self.args.intermediate_layer_mapping:
            head_losses["is"] = self._intermediate_sum(wrapper, hidden, states, taught.states, targets.ne(-100))

    def _intermediate_sum(self, wrapper, hidden, states, teacher_states, mask):
        """`L_is` summed over the mapped layer pairs and the target tokens, through the projection when there is one."""
        projection = getattr(wrapper, PROJECTION_NAME, None)
        is_sum = hidden.new_zeros((), dtype=torch.float32)
        for s, t in self.args.intermediate_layer_mapping:
            state = states[s] if projection is None else projection(states[s])
            is_sum = is_sum + intermediate_state_loss(
                state.reshape(-1, state.shape[-1])[mask],
                teacher_states[t].reshape(-1, teacher_states[t].shape[-1])[mask],
                self.args.intermediate_loss,
            )
        return is_sum

    def _fused_logit_loss(self, student, outputs, loss, kd_sum, ce_sum):
        """The fused path: the logit loss computed in the student's `lm_head` pre-hook."""
        if hasattr(student.get_output_embeddings().weight, "ds_id") and loss.requires_grad:
            # ZeRO-3 gathers the lm_head weight for backward when the gradient reaches the lm_head's output; the
            # fused loss bypasses that (empty) output, so tie the loss to it: adds 0, and makes the lm_head's
            # backward (weight gathered) wait for the fused gradients before DeepSpeed reduces and re-partitions.
            loss = loss + outputs.logits.sum()
        return loss, {"kd_loss": kd_sum, "ce_loss": ce_sum}

    def _logit_loss(self, outputs, taught, targets):
        """The unfused path: the KD and CE sums on the student's full logits."""
        options = self.loss_options
        logits = outputs.logits.reshape(-1, outputs.logits.shape[-1])
        kd = logits.new_zeros(()) if taught is None else self.teacher.kd_loss(taught, logits, targets, options)
        ce = F.cross_entropy(logits.float(), targets, ignore_index=-100, reduction="sum")
        metrics = {"ce_loss": ce.detach()} if taught is None else {"kd_loss": kd.detach(), "ce_loss": ce.detach()}
        return options.kd_weight * kd + options.ce_weight * ce, metrics

    def _router_loss(self, student, outputs, mask, metrics):
        """MoE students: the weighted router load-balancing loss, as a token sum."""
        if getattr(outputs, "aux_loss", None) is None:
            raise ValueError(
                f"DistillationConfig.router_aux_loss_coef is set, but {type(student).__name__} returns no router "
                "load-balancing loss (aux_loss): it is not a Mixture-of-Experts model. Leave it None."
            )
        # The loss is a per-batch mean; the other terms are token sums normalised below: scale it to a sum.
        router_sum = outputs.aux_loss.float() * mask.sum()
        metrics["router_aux_loss"] = router_sum.detach()
        return self.args.router_aux_loss_coef * router_sum

    def _intermediate_term(self, logit_loss, is_sum, mask, metrics):
        """`alpha * L_is`, with `alpha` fixed or dynamic (`intermediate_loss_weight`)."""
        if self.args.intermediate_loss_weight == "dynamic":
            # alpha = L_logits / L_is, detached: L_is contributes as much as the logit loss (paper 1 §2.4).
            alpha = logit_loss.detach() / is_sum.detach().clamp_min(1e-8)
        else:
            alpha = torch.tensor(self.args.intermediate_loss_weight, device=is_sum.device)
        metrics.update(is_loss=is_sum.detach(), is_loss_weight=alpha * mask.sum())
        return alpha * is_sum

    def _normalise(self, loss, mask, num_items_in_batch, training):
        """The summed loss per target token of the accumulated batch (see `compute_loss`)."""
        if num_items_in_batch is not None:
            loss = loss / num_items_in_batch
            if self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
                loss = loss * self.accelerator.num_processes  # the count spans all ranks; DDP averages gradients
            return loss
        loss = loss / mask.sum().clamp_min(1)
        if training:
            loss = loss / self.current_gradient_accumulation_steps
        return loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Evaluation: the loss only (per-token metrics are accumulated by `compute_loss` and reported by `log`)."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    # ------------------------------------------------------------------------------------------------ logging
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "eval" if any(key.startswith("eval_") for key in logs) else "train"
        metrics = self._metrics[mode]
        if metrics["tokens"]:
            keys = [key for key in metrics if key != "tokens"]
            sums = torch.stack([torch.stack(metrics[key]).sum() for key in [*keys, "tokens"]])
            if self.accelerator.num_processes > 1:
                sums = self.accelerator.reduce(sums, reduction="sum")
            tokens = max(sums[-1].item(), 1.0)
            prefix = "eval_" if mode == "eval" else ""
            for key, value in zip(keys, sums[:-1].tolist()):
                logs[prefix + key] = value / tokens
            if mode == "eval":
                # Held-out LM quality of the student: token-weighted CE over the whole evaluation set.
                logs["eval_loss"] = logs["eval_ce_loss"]
                logs["eval_perplexity"] = math.exp(min(logs["eval_ce_loss"], 50.0))
            metrics.clear()
        super().log(logs, start_time)

    # ------------------------------------------------------------------------------------------------ saving
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        # Checkpoints (internal calls) keep the projection so resuming restores it; the final model stays stock.
        self._final_save = not _internal_call
        try:
            super().save_model(output_dir, _internal_call)
        finally:
            self._final_save = False

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        model = self.accelerator.unwrap_model(self.model)
        if not hasattr(model, PROJECTION_NAME):
            return super()._save(output_dir, state_dict)
        if self._final_save:
            if state_dict is None:
                state_dict = model.state_dict()
            state_dict = {k: v for k, v in state_dict.items() if not k.startswith(PROJECTION_NAME + ".")}
            with _detached_projection(model):
                return super()._save(output_dir, state_dict)
        super()._save(output_dir, state_dict)
        if _is_peft(model) and self.args.should_save:
            # Written before `trainer_state.json`, so a checkpoint that has one also has this file.
            output_dir = output_dir if output_dir is not None else self.args.output_dir
            _save_projection(model, state_dict, os.path.join(output_dir, PROJECTION_WEIGHTS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        # A full student's checkpoint restored the projection with the weights; a PEFT one holds the adapter only.
        student = self.accelerator.unwrap_model(self.model)
        if not (_is_peft(student) and hasattr(student, PROJECTION_NAME)):
            return
        path = os.path.join(resume_from_checkpoint, PROJECTION_WEIGHTS_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{resume_from_checkpoint!r} has no {PROJECTION_WEIGHTS_NAME}: the intermediate-state projection of "
                "this LoRA student cannot be restored (the checkpoint predates it being saved), and a fresh one would "
                "not continue the run. Resume from a checkpoint written with it, or start a new run (new output_dir)."
            )
        _load_projection(getattr(student, PROJECTION_NAME), path)


def _split_batch(inputs: dict) -> tuple[dict, dict, torch.Tensor]:
    """`(model inputs, teacher-cache columns, next-token targets [tokens])` of a collated batch."""
    inputs = dict(inputs)
    labels = inputs.pop("labels", None)
    if labels is None:
        labels = inputs["input_ids"].masked_fill(inputs.get("attention_mask", 1) == 0, -100)
    # Position t predicts token t + 1: shift once, keep the sequence length (the last position has no target).
    targets = F.pad(labels[:, 1:], (0, 1), value=-100).reshape(-1)
    inputs["use_cache"] = False
    return inputs, CachedTeacher.pop_columns(inputs), targets


def _check_student(student: nn.Module, teacher: nn.Module | None, args) -> None:
    """Refuses, before training, what would fail (or silently do nothing) at its first step."""
    base = _unwrap_peft(student)
    if teacher is not None and (teacher is student or teacher is base):
        raise ValueError(
            "DistillationTrainer got the same model as student and teacher: the student would distil from itself "
            "(and prune_model prunes in place, so after `prune_model(teacher, ...)` the teacher IS the student). Keep "
            "a teacher: prune a copy (`prune_model(copy.deepcopy(teacher), ...)`) or reload it from its checkpoint."
        )
    if not any(p.requires_grad for p in student.parameters()):
        raise ValueError(
            "The student has no trainable parameters (every requires_grad is False, e.g. a model frozen like a "
            "teacher): nothing would be trained. Call student.requires_grad_(True), or pass a PEFT model."
        )
    if args.router_aux_loss_coef is not None and getattr(base.config, "num_experts_per_tok", None) is None:
        raise ValueError(
            f"DistillationConfig.router_aux_loss_coef={args.router_aux_loss_coef} is set, but the student "
            f"({type(base).__name__}) is not a Mixture-of-Experts model: it has no router loss. Leave it None."
        )


def _is_peft(model: nn.Module) -> bool:
    return hasattr(model, "peft_config")


def _save_projection(model: nn.Module, state_dict: dict | None, path: str) -> None:
    from safetensors.torch import save_file

    prefix = PROJECTION_NAME + "."
    if state_dict is None or not any(k.startswith(prefix) for k in state_dict):
        state_dict = getattr(model, PROJECTION_NAME).state_dict(prefix=prefix)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items() if k.startswith(prefix)}
    save_file(tensors, path, metadata={"format": "pt"})


def _load_projection(projection: nn.Module, path: str) -> None:
    from safetensors.torch import load_file

    prefix = PROJECTION_NAME + "."
    tensors = {k[len(prefix) :]: v for k, v in load_file(path).items() if k.startswith(prefix)}
    if any(_is_sharded(p) for p in projection.parameters()):
        raise NotImplementedError(
            "Restoring the projection of a LoRA student into FSDP / ZeRO-3 sharded parameters is not supported: "
            "resume this run on one process, or use a full (non-LoRA) student."
        )
    projection.load_state_dict(tensors)


@contextlib.contextmanager
def _detached_projection(model: nn.Module):
    """Temporarily removes the projection submodule so `save_pretrained` sees a stock model."""
    projection = model._modules.pop(PROJECTION_NAME)
    try:
        yield
    finally:
        model._modules[PROJECTION_NAME] = projection
