"""`PrunedConfig`: the target architecture and how importance is estimated.

Like a PEFT config, it is a plain dataclass that saves and loads as JSON next to the weights
(`pruned_config.json`), so a pruned checkpoint records how it was made.
"""

import json
import os
from dataclasses import asdict, fields, make_dataclass

from .structures import STRUCTURES, depth
from .structures.fields import ConfigField


PRUNED_CONFIG_NAME = "pruned_config.json"

SEQUENCE_AGGREGATIONS = ("mean", "l2", "var")
BATCH_AGGREGATIONS = ("l2", "mean", "var")
IMPORTANCE_METHODS = ("activation", "magnitude", "random")

# The options of the importance pass itself, shared by every structure; they follow the structures' fields.
IMPORTANCE_FIELDS = (
    ConfigField(
        "importance",
        doc="""`"activation"` is Minitron's forward-only activation importance. `"magnitude"` (weight L2 norms) and
`"random"` are the baselines of the paper's ablations.""",
        help="Importance method.",
        type=str,
        default="activation",
        choices=IMPORTANCE_METHODS,
        target=False,
    ),
    ConfigField(
        "sequence_aggregation",
        doc='Reduction over the tokens of a sample: `"mean"` (mean of |x|), `"l2"` or `"var"`.',
        help="Reduction over tokens.",
        type=str,
        default="mean",
        choices=SEQUENCE_AGGREGATIONS,
        target=False,
    ),
    ConfigField(
        "batch_aggregation",
        doc='Reduction over samples: `"l2"`, `"mean"` or `"var"` (paper 1, Table 11: sequence mean, batch L2 is best).',
        help="Reduction over samples.",
        type=str,
        default="l2",
        choices=BATCH_AGGREGATIONS,
        target=False,
    ),
    ConfigField(
        "calibration_samples",
        doc="Number of calibration samples (paper 1 uses 1024).",
        help="Number of calibration samples.",
        type=int,
        default=1024,
        target=False,
    ),
    ConfigField(
        "calibration_batch_size",
        doc="Forward batch size during importance estimation.",
        help="Batch size of the calibration passes.",
        type=int,
        default=8,
        target=False,
    ),
    ConfigField(
        "calibration_seq_length",
        doc="Sequence length when raw text is tokenized for calibration.",
        help="Token length when calibration text is raw.",
        type=int,
        default=512,
        target=False,
    ),
    ConfigField(
        "seed",
        doc='Seed of the `"random"` baseline.',
        help="Seed for the random-selection baseline.",
        type=int,
        default=0,
        target=False,
    ),
)


def target_fields() -> tuple[str, ...]:
    """The target sizes of `PrunedConfig`: every structure's `FIELDS`, in the order of `structures.STRUCTURES`."""
    return tuple(dict.fromkeys(name for structure in STRUCTURES for name in structure.FIELDS))


def config_fields() -> tuple[ConfigField, ...]:
    """Every field of `PrunedConfig`, in order: the structures' targets, then their options (both in the order of
    `STRUCTURES`), then the importance pass's."""
    declared = [f for structure in STRUCTURES for f in structure.CONFIG_FIELDS]
    return (*(f for f in declared if f.target), *(f for f in declared if not f.target), *IMPORTANCE_FIELDS)


def shape_fields() -> tuple[str, ...]:
    """The fields that decide the pruned shape (targets, `layers_to_drop`, `num_layers_by_type`)."""
    return tuple(f.name for f in config_fields() if f.shapes)


_DOC = """Target shape of a pruned model and the options of Minitron importance estimation.

    Every target left to `None` keeps the source model's value. Each structure of `pruning/structures/` declares its
    own fields (`CONFIG_FIELDS`); this class assembles them.

    Args:
"""


class _PrunedConfigMethods:
    """What `PrunedConfig` does with its fields; the fields come from the structures (`config_fields`)."""

    def __post_init__(self):
        for structure in STRUCTURES:  # values a user may write in another form (a JSON string, an older boolean)
            prepare = getattr(structure, "prepare_config", None)
            if prepare is not None:
                prepare(self)
        self._validate_standalone()

    # ------------------------------------------------------------------ validation
    def _validate_standalone(self):
        for f in config_fields():
            value = getattr(self, f.name)
            if (
                f.target
                and value is not None
                and (isinstance(value, bool) or not isinstance(value, int) or value <= 0)
            ):
                raise ValueError(
                    f"PrunedConfig.{f.name}={value!r} is invalid: expected a positive integer, or None to keep the "
                    f"source model's {f.name}."
                )
            if f.choices and value not in f.choices:
                raise ValueError(f"PrunedConfig.{f.name}={value!r} is not supported: choose one of {list(f.choices)}.")
            if f.type is bool and not isinstance(value, bool):
                raise ValueError(f"PrunedConfig.{f.name}={value!r} is invalid: expected true or false.")
        for name in ("calibration_samples", "calibration_batch_size", "calibration_seq_length"):
            value = getattr(self, name)
            # bool is an int in Python: `calibration_samples: true` in a YAML is a typo, not 1 sample.
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"PrunedConfig.{name}={value!r} is invalid: expected a positive integer.")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"PrunedConfig.seed={self.seed!r} is invalid: expected an integer.")
        for structure in STRUCTURES:  # what each structure asks of its own fields alone (e.g. head groups)
            structure.check_target(self)

    def depth_scorer_tasks(self) -> list[str]:
        """The lm-eval task names of `depth_scorer` (empty without one)."""
        return depth.scorer_tasks(self)

    def validate_for(self, model_config) -> None:
        """Checks the targets against the source model's config; raises `ValueError` naming the field and the fix.

        Called by `prune_model` and `estimate_importance` before any forward pass.
        """
        from ..architectures import ARCHITECTURES, model_shape

        shape = model_shape(model_config)
        spec = ARCHITECTURES.get(model_config.model_type)
        # First whether each target applies to this model, then whether it is within the source's size, then what
        # each structure asks of its targets; each step walks the structures in order, and the first error is raised.
        for structure in STRUCTURES:
            structure.check_applies(self, model_config, shape, spec)
        for name in target_fields():
            target = getattr(self, name)
            if name in shape and target is not None and target > shape[name]:
                raise ValueError(
                    f"PrunedConfig.{name}={target} is larger than the source model's {name}={shape[name]}: pruning "
                    f"only removes structure. Use a value <= {shape[name]}, or None to keep it."
                )
        for structure in STRUCTURES:
            structure.check_target(self, model_config, shape)

    def resolve(self, model_config) -> dict:
        """The full target shape (source values filled in), after `validate_for`."""
        from ..architectures import model_shape

        self.validate_for(model_config)
        shape = model_shape(model_config)
        names = [name for name in target_fields() if name in shape]
        target = {name: getattr(self, name) or shape[name] for name in names}
        for structure in STRUCTURES:  # sizes a target gives beyond its fields' (per-layer MLP widths)
            complete = getattr(structure, "complete_target", None)
            if complete is not None:
                complete(self, model_config, target)
        if self.layers_to_drop is not None:
            target["num_hidden_layers"] = model_config.num_hidden_layers - len(self.layers_to_drop)
        elif self.num_layers_by_type is not None:
            from .structures.depth import resolve_layers_by_type

            target["num_hidden_layers"] = sum(resolve_layers_by_type(model_config, self.num_layers_by_type).values())
        return target

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "PrunedConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"Unknown PrunedConfig field(s) {unknown}. Valid fields: {sorted(known)}. Check the spelling in your "
                "JSON/YAML file."
            )
        return cls(**data)

    def to_json_file(self, path: str | os.PathLike) -> None:
        from ..io import atomic_write_json

        atomic_write_json(path, self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "PrunedConfig":
        """Loads a `.json` or `.yaml`/`.yml` file (a directory means its `pruned_config.json`)."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, PRUNED_CONFIG_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"No PrunedConfig file at {path!r}: pass a JSON/YAML file or a pruned checkpoint.")
        import yaml

        try:
            with open(path, encoding="utf-8") as f:
                data = (yaml.safe_load(f) or {}) if path.endswith((".yaml", ".yml")) else json.load(f)
        except (json.JSONDecodeError, yaml.YAMLError, UnicodeDecodeError) as error:
            raise ValueError(
                f"{path!r} is not a valid PrunedConfig file ({error}): it was truncated or edited by hand. Fix it, or "
                "write it again with PrunedConfig(...).save_pretrained(dir)."
            ) from None
        if not isinstance(data, dict):
            raise ValueError(f"{path!r} must hold a mapping of PrunedConfig fields, got {type(data).__name__}.")
        return cls.from_dict(data)

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        os.makedirs(save_directory, exist_ok=True)
        self.to_json_file(os.path.join(save_directory, PRUNED_CONFIG_NAME))

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> "PrunedConfig":
        return cls.from_file(os.path.join(directory, PRUNED_CONFIG_NAME))


# A dataclass like any other (`fields`, `asdict`, `HfArgumentParser`, the signature IDEs and notebooks complete), built
# from the structures' declarations so that a new structure's fields need no edit here.
PrunedConfig = make_dataclass(
    "PrunedConfig",
    [f.dataclass_field() for f in config_fields()],
    bases=(_PrunedConfigMethods,),
    namespace={"__doc__": _DOC + "\n".join(f.docstring() for f in config_fields()) + "\n    ", "__module__": __name__},
)
