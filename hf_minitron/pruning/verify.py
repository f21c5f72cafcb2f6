"""The check every pruned model passes before `prune_model` returns it: each tensor has exactly the shape that a
fresh model of its new config has, and the model runs a forward pass.

Slicing follows the family's spec. A spec that is wrong for the model (a norm left out of `residual_norms`, two
projections named in each other's roles, a custom family described by hand) slices the wrong tensors or misses some,
and the result can neither run nor reload: without this check it would be saved and reported as pruned. The shapes
are compared against a model built on the `meta` device (no memory, no weights), so the check costs one short
forward pass.
"""

import torch

from ..runtime import input_device


def _shape_mismatches(model) -> list[str]:
    with torch.device("meta"):
        fresh = type(model)(model.config)
    expected = {name: tuple(t.shape) for name, t in fresh.state_dict().items()}
    actual = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    problems = [f"{name}: {actual[name]}, the config wants {shape}" for name, shape in expected.items()
                if name in actual and actual[name] != shape]  # fmt: skip
    problems += [f"{name}: missing" for name in expected if name not in actual]
    problems += [f"{name}: not in a model of this config" for name in actual if name not in expected]
    return problems


def spec_hint(custom_spec: bool) -> str:
    """What a failed check most likely means: a caller's spec that does not fit the model, or our bug."""
    if custom_spec:
        return (
            " The ArchitectureSpec passed as spec= is the likely cause: check that residual_norms names every norm that "
            "reads the residual stream and that q/k/v/o and gate/up/down name the modules in those roles."
        )
    return " This is a bug in hf-minitron's description of this family: please report it with the model's config."


def check_pruned_model(model, custom_spec: bool = False) -> None:
    """Raises `ValueError` naming what is wrong when `model`'s tensors do not have the shapes of a fresh model of its
    (pruned) config, or when it fails a forward pass on a few tokens.

    Args:
        model (`PreTrainedModel`): the sliced model, its config already updated.
        custom_spec (`bool`, *optional*, defaults to `False`): the family was described by a `spec=` of the caller's,
            the likeliest cause of a mismatch: the message says what to check in it.
    """
    hint = spec_hint(custom_spec)
    problems = _shape_mismatches(model)
    if problems:
        shown = "; ".join(problems[:4]) + (f"; and {len(problems) - 4} more" if len(problems) > 4 else "")
        raise ValueError(
            f"The pruned model does not match its own config ({len(problems)} tensors): {shown}. Nothing was saved; "
            f"the model in memory is unusable.{hint}"
        )
    vocab = model.get_input_embeddings().num_embeddings
    ids = torch.arange(1, 5, device=input_device(model)).remainder(vocab).unsqueeze(0)
    try:
        with torch.no_grad():
            model(input_ids=ids)
    except Exception as error:  # any failure here means the sliced model cannot be used
        raise ValueError(
            f"The pruned model fails a forward pass ({type(error).__name__}: {error}). Nothing was saved; the model in "
            f"memory is unusable.{hint}"
        ) from None
