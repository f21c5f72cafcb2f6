"""The teacher as [`DistillationTrainer`] uses it: one interface, [`Teacher`], and one implementation per kind.

| kind | class | what a batch's teacher outputs come from |
|---|---|---|
| live | [`LiveTeacher`] | the teacher's forward on the batch (one process, or replicated) |
| sharded | [`ShardedTeacher`] | the same, its `lm_head` weight sharded (FSDP2, DeepSpeed ZeRO-3) |
| cached | [`~teacher_cache.CachedTeacher`] | the batch's teacher-cache columns: no teacher model at all |

For each batch, `forward` runs once, before the student's forward, and returns a [`TeacherOutput`], or `None` when
the batch has no teacher outputs (held-out data without a cache's columns: the loss is then the student's CE only).
The logit loss then comes from `fused_loss`, called inside the student's forward from its `lm_head` pre-hook
([`_HeadCapture`], which also captures the teacher's states), or from `kd_loss` on the student's full logits.
"""

from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn

from ..architectures import ARCHITECTURES, get_base_model, get_decoder_layers
from .config import EMBEDDING_STATE
from .losses import KDLossOptions, fused_kd_loss_with_options, kd_loss


@dataclass
class TeacherOutput:
    """What a teacher gives for one batch, over its `tokens = batch * seq` positions (constants of the student's loss).

    Args:
        hidden (`torch.Tensor` of shape `[tokens, hidden]`, *optional*): Post-norm final hidden states.
        weight (`torch.Tensor` of shape `[vocab_t, hidden]`, *optional*): The `lm_head` weight to apply to them.
        bias (`torch.Tensor` of shape `[vocab_t]`, *optional*): Its bias.
        logits (`torch.Tensor` of shape `[batch, seq, vocab_t]`, *optional*): The logits, when the `lm_head` ran.
        topk (`tuple` of `torch.Tensor`, *optional*): A top-k cache's `(ids [tokens, k], log_probs [tokens, k],
            rest [tokens])`, see [`topk_kd_loss`].
        sampled (`tuple`, *optional*): A sampled cache's `(ids [tokens, w], counts [tokens, w], num_samples,
            entropy [tokens])`, see [`sampled_kd_loss`].
        states (`dict[int, torch.Tensor]`): Normed intermediate states `[batch, seq, hidden]` by layer index.
    """

    hidden: torch.Tensor | None = None
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    topk: tuple | None = None
    sampled: tuple | None = None
    states: dict[int, torch.Tensor] = field(default_factory=dict)


class Teacher:
    """A frozen teacher, whatever its kind: what `DistillationTrainer.compute_loss` asks of it.

    `softcap` is the Gemma-2 `final_logit_softcapping` of its logits (`None` without), for [`KDLossOptions`].
    `fused_loss` here serves every teacher that gives final hidden states and an `lm_head` ([`fused_kd_loss`]).
    """

    softcap: float | None = None

    def forward(self, inputs: dict, columns: dict, layers: list[int], fused: bool) -> TeacherOutput | None:
        """The teacher's outputs for a batch of model `inputs` and teacher-cache `columns` (empty without a cache),
        with the normed states of `layers`; with `fused` the full logits are not needed."""
        raise NotImplementedError

    def fused_loss(
        self,
        output: TeacherOutput,
        hidden: torch.Tensor,
        head: nn.Linear,
        targets: torch.Tensor,
        options: KDLossOptions,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`(loss, kd_sum, ce_sum)` for the student's final hidden states `[batch, seq, hidden]` and `lm_head`, and
        next-token `targets [tokens]` (`-100`: ignored)."""
        hidden = hidden.reshape(-1, hidden.shape[-1])
        return fused_kd_loss_with_options(
            hidden, head.weight, output.hidden, output.weight, targets, options, head.bias, output.bias
        )

    def kd_loss(
        self, output: TeacherOutput, logits: torch.Tensor, targets: torch.Tensor, options: KDLossOptions
    ) -> torch.Tensor:
        """The KD sum on the student's full logits `[tokens, vocab]`."""
        raise NotImplementedError


class LiveTeacher(Teacher):
    """A teacher model run on every batch, under `no_grad`, in `eval()` mode.

    Args:
        model (`nn.Module`): The teacher as prepared by the accelerator (what is called).
        unwrapped (`PreTrainedModel`, *optional*): The model inside it (hooked, and read for its config); defaults to
            `model`.
    """

    def __init__(self, model: nn.Module, unwrapped: nn.Module | None = None):
        self.model = model
        self.unwrapped = model if unwrapped is None else unwrapped
        self.softcap = getattr(self.unwrapped.config, "final_logit_softcapping", None)

    def forward(self, inputs, columns, layers, fused):
        output = TeacherOutput()
        with torch.no_grad(), _HeadCapture(self.unwrapped, layers, partial(self._capture, output), skip_head=fused):
            output.logits = self.model(**inputs).logits
        return output

    def _capture(self, output, head, hidden, states):
        output.hidden = hidden.reshape(-1, hidden.shape[-1])
        output.weight, output.bias, output.states = self._head_weight(head), head.bias, states

    def _head_weight(self, head: nn.Linear) -> torch.Tensor:
        return head.weight.detach()

    def kd_loss(self, output, logits, targets, options):
        teacher_logits = output.logits.reshape(-1, output.logits.shape[-1])[:, : logits.shape[-1]]
        return kd_loss(logits, teacher_logits, targets, **options.divergence)


class ShardedTeacher(LiveTeacher):
    """A live teacher whose `lm_head` weight is sharded (a DTensor under FSDP2, partitioned under ZeRO-3): gathered
    only inside the teacher's forward, so the fused loss, which runs later, gets a copy taken there."""

    def _head_weight(self, head):
        return head.weight.detach().clone()


def _is_sharded(param: torch.Tensor) -> bool:
    """A parameter owned by FSDP2 (a DTensor outside forward) or by DeepSpeed ZeRO-3 (partitioned)."""
    return type(param).__name__ == "DTensor" or hasattr(param, "ds_id")


class _HeadCapture:
    """Forward hooks that expose a causal LM's final hidden states and (normed) intermediate states.

    Inside the model's forward, a pre-hook on the `lm_head` calls `on_head(head, hidden, states)` with the post-norm
    final hidden states `[batch, seq, hidden]` and `{index: normed state}`, where the state of layer `i` is its output
    and that of `EMBEDDING_STATE` the embedding output (the input of layer 0); with `skip_head=True` it then hands the
    `lm_head` an empty sequence slice, so the full logits are never computed.

    Paper 1 §2.4 compares post-LayerNorm states: a state is taken as the output of the norm that reads it, the next
    layer's input norm (hooked, so it runs inside that layer's forward, where FSDP2 / ZeRO-3 have gathered its
    weights), or the final norm after the last layer and in families without input norms (post-norm blocks).
    """

    def __init__(self, model: nn.Module, layers: list[int], on_head, skip_head: bool):
        self.model, self.layers, self.on_head, self.skip_head = model, layers, on_head, skip_head
        self.outputs: dict[int, torch.Tensor] = {}
        self.normed: set[int] = set()
        self.handles = []
        self.final_norm = "norm"

    def __enter__(self):
        decoder_layers = get_decoder_layers(self.model)
        spec = ARCHITECTURES.get(self.model.config.model_type)
        input_norm = spec.attn_input_norm if spec is not None else None
        if spec is not None:
            self.final_norm = spec.final_norm  # Nemotron-H: `norm_f`
        for index in self.layers:
            following = 0 if index == EMBEDDING_STATE else index + 1
            if input_norm and following < len(decoder_layers):
                norm = getattr(decoder_layers[following], input_norm)
                self.handles.append(norm.register_forward_hook(self._normed_hook(index)))
                self.normed.add(index)
            elif index == EMBEDDING_STATE:
                self.handles.append(decoder_layers[0].register_forward_pre_hook(self._input_hook, with_kwargs=True))
            else:
                self.handles.append(decoder_layers[index].register_forward_hook(self._layer_hook(index)))
        self.handles.append(self.model.get_output_embeddings().register_forward_pre_hook(self._head_hook))
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        self.outputs.clear()

    def _normed_hook(self, index):
        def hook(module, args, output):
            self.outputs[index] = output

        return hook

    def _input_hook(self, module, args, kwargs):
        self.outputs[EMBEDDING_STATE] = args[0] if args else kwargs["hidden_states"]

    def _layer_hook(self, index):
        def hook(module, args, output):
            self.outputs[index] = output[0] if isinstance(output, tuple) else output

        return hook

    def _head_hook(self, head, args):
        hidden = args[0]
        # The final norm runs here, inside the root forward, where its sharded weight is gathered.
        norm = getattr(get_base_model(self.model), self.final_norm)
        states = {i: self.outputs[i] if i in self.normed else norm(self.outputs[i]) for i in self.layers}
        self.on_head(head, hidden, states)
        if self.skip_head:
            return (hidden[:, :0],) + tuple(args[1:])
        return None
