"""`ConfigField`: one `PrunedConfig` field, declared by the structure that reads it.

`PrunedConfig` (`pruning/config.py`) is assembled from the `CONFIG_FIELDS` of every structure, in the order of
`STRUCTURES` (targets first, then options), followed by the options of the importance pass itself. So a structure's
targets, their `--help` lines and their entries in the `Args:` docstring live in its module, and adding a structure
adds its fields without editing the config.
"""

import dataclasses
import types
import typing
from dataclasses import dataclass


@dataclass(frozen=True)
class ConfigField:
    """One field of `PrunedConfig`.

    Args:
        name (`str`): the field's name; for a target, also the `model_shape` key of the source's size.
        doc (`str`): its entry in `PrunedConfig`'s docstring (what it does, what it accepts).
        help (`str`): its one-line `--help` text; a target's says "target".
        type (*optional*, defaults to `int | None`): its annotation, what `HfArgumentParser` parses.
        default (*optional*, defaults to `None`): its default; `None` for a target keeps the source's size.
        choices (`tuple`, *optional*): the values it accepts, checked when a `PrunedConfig` is built.
        target (`bool`, *optional*, defaults to `True`): a target size (a positive integer, at most the source's).
        sets_shape (`bool`, *optional*): whether it decides the pruned shape (targets do; so do `layers_to_drop` and
            `num_layers_by_type`): the search chooses those itself and refuses them among its shared options.
    """

    name: str
    doc: str
    help: str
    type: object = int | None
    default: object = None
    choices: tuple | None = None
    target: bool = True
    sets_shape: bool | None = None

    @property
    def shapes(self) -> bool:
        return self.target if self.sets_shape is None else self.sets_shape

    def dataclass_field(self) -> tuple:
        """`(name, type, field)` for `dataclasses.make_dataclass`."""
        metadata = {"help": self.help} | ({"choices": list(self.choices)} if self.choices else {})
        return self.name, self.type, dataclasses.field(default=self.default, metadata=metadata)

    def docstring(self) -> str:
        """Its entry in an `Args:` section, in the transformers docstring style."""
        kind = _type_name(self.type)
        default = "" if self.default is None else f", defaults to `{self.default!r}`".replace("'", '"')
        text = "\n".join(f"            {line}" if line else "" for line in self.doc.strip().splitlines())
        return f"        {self.name} (`{kind}`, *optional*{default}):\n{text}"


def _type_name(annotation) -> str:
    """`int | None` -> `int`, `dict[str, int] | str | None` -> `dict[str, int] | str`."""
    args = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    return " | ".join(
        arg.__name__ if typing.get_origin(arg) is None else str(arg) for arg in args if arg is not type(None)
    )


def target_names(config_fields) -> tuple[str, ...]:
    """The names of the targets among `config_fields` (a structure's `FIELDS`)."""
    return tuple(f.name for f in config_fields if f.target)


def refuse_absent_target(config, name: str, model_config, shape: dict, what: str, block: str) -> None:
    """Refuses target `name` when the model's shape has no such size: `model_config` has no `what`. The error names
    the families that have it (their spec's `block` field is set)."""
    value = getattr(config, name)
    if value is None or name in shape:
        return
    from ...architectures import ARCHITECTURES

    families = sorted(k for k, v in ARCHITECTURES.items() if getattr(v, block) is not None)
    raise ValueError(
        f"PrunedConfig.{name}={value} does not apply: model_type={model_config.model_type!r} has no {what}. Leave it "
        f"None (families with {what}: {', '.join(families)})."
    )
