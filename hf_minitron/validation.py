"""Early checks of user input: checkpoints on disk, config values read from YAML/JSON, sequence lengths, tokenizers.

Each check is cheap (file headers, configs, vocabularies) and runs before weights are loaded or data is packed, so
bad input fails in seconds with an error naming the cause and the fix, instead of deep inside transformers,
safetensors or a training loop.
"""

import dataclasses
import json
import math
import os
import types
import typing
from pathlib import Path


CONFIG_NAME = "config.json"
SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
_PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")


# ---------------------------------------------------------------------------------------------- launched processes
def check_process_group(training_args, use_cpu_field: str = "use_cpu") -> None:
    """Every process the launcher started must have joined one process group.

    Without GPUs, `TrainingArguments` builds a gloo group only with `use_cpu` (DDP, FSDP) or `ddp_backend="gloo"`
    (DeepSpeed, which accelerate turns off under `use_cpu`); otherwise each of the N launched processes trains the
    whole run alone and they all write the same outputs. `training_args.world_size` sets the group up (the Trainer
    would do it anyway), so this costs nothing before the weights are loaded.
    """
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    joined = training_args.world_size
    if joined != launched:
        raise ValueError(
            f"This run was launched with WORLD_SIZE={launched} processes, but they form a group of {joined}: without "
            f"GPUs, set `{use_cpu_field}: true` (or ACCELERATE_USE_CPU=true; under DeepSpeed set `ddp_backend: gloo` "
            "instead) so that the processes train together on the CPU instead of each running, and writing, the "
            "whole run."
        )


# ---------------------------------------------------------------------------------------------- checkpoints on disk
def _looks_like_local_path(name: str) -> bool:
    """A Hub id is `name` or `namespace/name`; `/x`, `./x`, `~/x`, `a/b/c` and `dir/x` with an existing `dir` are
    meant as local paths."""
    if os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1:
        return True
    return "/" in name and Path(name).parent.is_dir()


def check_safetensors_file(path: str | os.PathLike) -> None:
    """Opens a `.safetensors` file the way `from_pretrained` will (`safe_open` reads the header and checks that the file
    covers every tensor it declares, without reading the tensors).

    Raises:
        `ValueError`: the file is truncated or its header is not a safetensors header.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    fix = "re-download the checkpoint, or save it again with save_pretrained"
    try:
        with safe_open(str(path), framework="pt"):
            pass
    except SafetensorError as error:
        size = path.stat().st_size
        if "not fully covered" in str(error):
            raise ValueError(
                f"{path} is truncated: {size} bytes on disk, fewer than its header declares (an interrupted download "
                f"or copy): {fix}."
            ) from None
        raise ValueError(f"{path} is truncated or has a corrupt safetensors header ({error}): {fix}.") from None


def check_checkpoint(name_or_path: str) -> None:
    """Checks a local checkpoint directory before anything is loaded from it: `config.json` and safetensors weights
    (every shard present and complete). Hub ids are left to `from_pretrained`; a path that does not exist fails here.

    Raises:
        `FileNotFoundError`: the path, its `config.json` or its weights are missing.
        `ValueError`: the weights are pickle files only, or a safetensors file is truncated or corrupt.
    """
    path = Path(os.path.expanduser(name_or_path))
    if not path.exists():
        if _looks_like_local_path(str(name_or_path)):
            raise FileNotFoundError(
                f"Model checkpoint {str(name_or_path)!r} does not exist: pass an existing directory written by "
                "save_pretrained (config.json + model.safetensors), a Hub id such as 'HuggingFaceTB/SmolLM2-135M', or "
                "'embedded'."
            )
        return  # a Hub id
    if not path.is_dir():
        raise FileNotFoundError(
            f"Model checkpoint {str(path)!r} is a file: pass the directory that holds config.json and the weights."
        )
    if not (path / CONFIG_NAME).is_file():
        raise FileNotFoundError(
            f"Model checkpoint {str(path)!r} holds no {CONFIG_NAME}, so it is not a transformers checkpoint: pass the "
            "directory written by save_pretrained (config.json + model.safetensors)."
        )
    index = path / SAFE_WEIGHTS_INDEX_NAME
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise FileNotFoundError(
                f"Model checkpoint {str(path)!r} is incomplete: {len(missing)} of the {len(shards)} shards listed in "
                f"{SAFE_WEIGHTS_INDEX_NAME} are missing ({missing[:3]}): download or copy the whole checkpoint."
            )
        files = [path / s for s in shards]
    elif (path / SAFE_WEIGHTS_NAME).is_file():
        files = [path / SAFE_WEIGHTS_NAME]
    elif any((path / name).is_file() for name in _PICKLE_WEIGHTS):
        raise ValueError(
            f"Model checkpoint {str(path)!r} holds only pickle weights (pytorch_model.bin), and hf-minitron loads "
            "safetensors only (unpickling a file can run code). Convert it once where you trust it: "
            "`AutoModelForCausalLM.from_pretrained(path).save_pretrained(path)` writes model.safetensors."
        )
    else:
        raise FileNotFoundError(
            f"Model checkpoint {str(path)!r} holds no weights ({SAFE_WEIGHTS_NAME} or {SAFE_WEIGHTS_INDEX_NAME}): "
            "copy the weights next to config.json, or pass the directory written by save_pretrained."
        )
    for file in files:
        check_safetensors_file(file)


def load_model_config(name_or_path: str, trust_remote_code: bool = False):
    """`AutoConfig.from_pretrained` after `check_checkpoint`, with Hub/network failures explained."""
    from transformers import AutoConfig

    check_checkpoint(name_or_path)
    try:
        return AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except OSError as error:
        reason = str(error).strip().splitlines()[0]
        raise OSError(
            f"Could not load the config of model {name_or_path!r}: it is not a local directory, and as a Hub id it "
            f"failed ({reason}). Pass a local checkpoint directory, a Hub id reachable from here (HF_HUB_OFFLINE "
            "unset, logged in for gated models), or 'embedded'."
        ) from None


def check_sequence_length(model_config, length: int, field_name: str) -> None:
    """Refuses samples longer than the positions the model was trained on (`max_position_embeddings`)."""
    limit = getattr(model_config, "max_position_embeddings", None)
    if limit is not None and length > limit:
        raise ValueError(
            f"{field_name}={length} is longer than the model's max_position_embeddings={limit}: positions beyond "
            f"{limit} were never trained, so importance and losses there are meaningless. Use {field_name} <= "
            f"{limit}."
        )


# ---------------------------------------------------------------------------------------------- non-finite numbers
class NonFiniteError(FloatingPointError):
    """A loss, a gradient or a weight is NaN or infinite: the model must not be trained on, saved or published."""


def check_finite_fields(config, name: str | None = None) -> None:
    """Refuses a NaN or infinite float in any field of the dataclass `config` (loss weights, temperatures, learning
    rates): Python's comparisons are all false for NaN, so range checks alone let it through, and training on it
    writes an all-NaN model."""
    name = name or type(config).__name__
    for field in dataclasses.fields(config):
        value = getattr(config, field.name, None)
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(
                f"{name}.{field.name}={value!r} is invalid: use a finite number (NaN and infinity would make every loss "
                "and weight NaN)."
            )


def check_finite_weights(directory: str | os.PathLike) -> None:
    """Refuses a checkpoint folder whose weights (`model.safetensors`, the shards of its index, or a LoRA
    `adapter_model.safetensors`) hold a NaN or infinite value, reading one tensor at a time. Run before a model is
    committed, carded or pushed.

    Raises:
        `NonFiniteError`: naming the file, the tensor and how many values are not finite.
    """
    import torch
    from safetensors import safe_open

    directory = Path(directory)
    names = {SAFE_WEIGHTS_NAME, "adapter_model.safetensors"}
    if (directory / SAFE_WEIGHTS_INDEX_NAME).is_file():
        names |= set(
            json.loads((directory / SAFE_WEIGHTS_INDEX_NAME).read_text(encoding="utf-8"))["weight_map"].values()
        )
    for file in sorted(directory / name for name in names if (directory / name).is_file()):
        with safe_open(str(file), framework="pt") as weights:
            for key in weights.keys():
                tensor = weights.get_tensor(key)
                if not tensor.is_floating_point():
                    continue
                bad = int((~torch.isfinite(tensor)).sum())
                if bad:
                    raise NonFiniteError(
                        f"{file.name} holds {bad} NaN/infinite values of {tensor.numel()} in {key!r}: the model is broken "
                        "(training diverged, or a loss weight, temperature or learning rate was not finite), so it is "
                        "not saved, carded or pushed. Lower the learning rate, check the loss settings and the data, and "
                        "train again from the last good checkpoint or afresh."
                    )


# ---------------------------------------------------------------------------------------------- tokenizers
def check_same_tokenizer(student_tokenizer, teacher_tokenizer, student_name: str, teacher_name: str) -> None:
    """Logit distillation compares distributions over token ids: both models must map ids to the same tokens."""
    student_vocab, teacher_vocab = student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
    if student_vocab == teacher_vocab:
        return
    differ = sorted(set(student_vocab.items()) ^ set(teacher_vocab.items()), key=lambda item: item[1])
    example = differ[0] if differ else None
    raise ValueError(
        f"The student's tokenizer ({student_name}, {len(student_vocab)} tokens) and the teacher's ({teacher_name}, "
        f"{len(teacher_vocab)} tokens) differ (e.g. token {example[0]!r} -> id {example[1]}). Logit distillation "
        "compares next-token distributions id by id, so both must share one tokenizer: distil from the teacher the "
        "student was pruned from, or give the student the teacher's tokenizer."
    )


# ---------------------------------------------------------------------------------------------- config values
def read_config_file(path: str | os.PathLike, what: str = "config") -> dict:
    """The mapping in a YAML (`.yaml`/`.yml`) or JSON file, with a missing file or a syntax error explained.

    Raises:
        `FileNotFoundError`: the file does not exist.
        `ValueError`: a syntax error (with its line) or a top level that is not a mapping.
    """
    import yaml

    path = str(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"The {what} file {path!r} does not exist: check the path.")
    text = Path(path).read_text(encoding="utf-8")
    try:
        data = yaml.safe_load(text) if path.endswith((".yaml", ".yml")) else json.loads(text)
    except (yaml.YAMLError, json.JSONDecodeError) as error:
        raise ValueError(
            f"The {what} file {path!r} is not valid {'YAML' if path.endswith(('.yaml', '.yml')) else 'JSON'}: "
            f"{' '.join(str(error).split())}. Fix the syntax at that line."
        ) from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ValueError(
            f"The {what} file {path!r} must hold a mapping of option names to values (`key: value` lines), got "
            f"{type(data).__name__}."
        )
    return data


def _accepts(value, annotation) -> tuple[bool, object]:
    """Whether `value` fits `annotation` (simple types, unions, lists, dicts), and the value to use.

    YAML 1.1 reads `1e-4` as a string: a numeric string is accepted (and converted) for a numeric field.
    """
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            ok, converted = _accepts(value, arg)
            if ok:
                return True, converted
        return False, value
    if annotation is type(None):
        return value is None, value
    if annotation is bool:
        return isinstance(value, bool), value
    if annotation in (int, float):
        if isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                return False, value
            if annotation is int and not number.is_integer():
                return False, value
            return True, annotation(number)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False, value
        if annotation is int and not float(value).is_integer():
            return False, value
        return True, annotation(value)
    if annotation is str:
        return isinstance(value, str), value
    if annotation in (list, tuple) or origin in (list, tuple):
        return isinstance(value, (list, tuple)), value
    if annotation is dict or origin is dict:
        return isinstance(value, dict), value
    if origin is typing.Literal:
        return value in typing.get_args(annotation), value
    return True, value  # enums, nested configs, Any: left to the dataclass itself


def check_field_types(cls, values: dict, where: str) -> dict:
    """Checks `values` (read from YAML/JSON) against the field types of dataclass `cls`; returns them converted.

    Raises:
        `ValueError`: naming the field, the value, where it was read (`where`, e.g. "the 'pruning' section of
        minitron.yaml"), and the type expected.
    """
    hints = typing.get_type_hints(cls)
    checked = {}
    for name, value in values.items():
        annotation = hints.get(name)
        ok, converted = (True, value) if annotation is None else _accepts(value, annotation)
        if not ok:
            expected = getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")
            raise ValueError(
                f"{cls.__name__}.{name}={value!r} (in {where}) has the wrong type: expected {expected}. Fix the "
                "value in the recipe (numbers unquoted, true/false for booleans, [a, b] for lists)."
            )
        checked[name] = converted
    return checked


def check_renamed_options(dataclass_types, argv: list[str]) -> None:
    """Refuses an option that a command no longer has under that name, naming the new one.

    The commands share one vocabulary (the model a command starts from is `teacher`, the folder it writes is
    `output_dir`); a dataclass lists the names it used to have in a `RENAMED_OPTIONS` class attribute
    (`{old: new}`). Both `--old value` on the command line and `old:` in the `--config` file are refused, before
    any work, since argparse would otherwise call the flag unknown without saying what it became.
    """
    renamed = {
        old: (cls.__name__, new) for cls in dataclass_types for old, new in getattr(cls, "RENAMED_OPTIONS", {}).items()
    }
    if not renamed:
        return
    found = [
        (f"--{old}", "on the command line")
        for old in renamed
        if f"--{old}" in argv or any(a.startswith(f"--{old}=") for a in argv)
    ]
    if "--config" in argv and argv.index("--config") + 1 < len(argv):
        path = argv[argv.index("--config") + 1]
        if os.path.isfile(path):
            keys = read_config_file(path, "--config")
            found += [(f"{old}:", f"in {path}") for old in renamed if old in keys]
    if found:
        option, where = found[0]
        old = option.strip("-:")
        owner, new = renamed[old]
        spelled = f"--{new}" if option.startswith("--") else f"{new}:"
        raise ValueError(
            f"{option} ({where}) is now {spelled}: {owner}.{old} was renamed to {new}, the name every command uses. "
            f"Replace {option} with {spelled}."
        )


# Bounds of the numbers every training command takes (TrainingArguments' own and ours), checked before any work:
# `(low, high, low_inclusive, what it means)`; a bound of None is open. transformers accepts most of these silently
# (a negative learning rate trains uphill, 0 accumulation steps divides by zero hours later, 0 epochs writes an
# untrained model and a card for it).
_TRAINING_BOUNDS = {
    "max_steps": "-1 (train for num_train_epochs) or a positive number of steps",
    "num_train_epochs": "a positive number of epochs (it bounds training when max_steps is -1)",
    "gradient_accumulation_steps": "at least 1",
    "per_device_train_batch_size": "at least 1",
    "learning_rate": "a non-negative number",
    "warmup_ratio": "a number in [0, 1]",
    "kd_temperature": "a positive number up to 100 (1.0 is the Minitron default)",
    "eval_limit": "a positive number of samples, or unset for all",
    "limit": "a positive number of samples, or unset for all",
    "max_train_samples": "a positive number of samples, or unset for all",
    "max_eval_samples": "a positive number of samples",
    "num_fewshot": "0 or more examples",
    "batch_size": "at least 1",
}
# Beyond this a run never ends on any hardware: a typo (an extra zero run of digits), not a plan.
_MAX_STEPS_LIMIT = 10**9


def _within(name: str, value, args) -> bool:
    if name == "max_steps":
        return value == -1 or 0 < value <= _MAX_STEPS_LIMIT
    if name == "num_train_epochs":
        return getattr(args, "max_steps", -1) not in (-1, None) or value > 0
    if name in ("gradient_accumulation_steps", "per_device_train_batch_size", "batch_size"):
        return value >= 1
    if name == "learning_rate":
        return value >= 0
    if name == "warmup_ratio":
        return 0 <= value <= 1
    if name == "kd_temperature":
        return 0 < value <= 100
    if name in ("eval_limit", "limit", "max_train_samples"):
        return value is None or value >= 1
    if name == "max_eval_samples":
        return value >= 1
    if name == "num_fewshot":
        return value is None or value >= 0
    return True


def check_numbers(args, name: str | None = None) -> None:
    """Refuses a number of the dataclass `args` outside its meaningful range (steps, accumulation, batch sizes,
    epochs, learning rate, warmup, temperature, sample limits), naming the field, the value and what is allowed."""
    name = name or type(args).__name__
    check_finite_fields(args, name)
    for field_name, allowed in _TRAINING_BOUNDS.items():
        if not hasattr(args, field_name):
            continue
        value = getattr(args, field_name)
        if isinstance(value, bool) or not (value is None or isinstance(value, (int, float))):
            continue  # types are checked where the values are parsed
        if value is None and field_name not in ("eval_limit", "limit", "max_train_samples", "num_fewshot"):
            continue
        if not _within(field_name, value, args):
            raise ValueError(f"{name}.{field_name}={value!r} is invalid: use {allowed}.")
