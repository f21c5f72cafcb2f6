"""`hf-minitron cache-teacher` and `recipes/cache_teacher.py`: its arguments and the one function that runs it."""

from dataclasses import dataclass, field

import torch

from ..data import TextDataArguments
from ..distillation.teacher_cache import MODES, QUANTIZED_DTYPES, STORAGE_DTYPES, cache_teacher


# ---------------------------------------------------------------------------------------------- command line
@dataclass
class CacheTeacherArguments(TextDataArguments):
    """What `hf-minitron cache-teacher` and `recipes/cache_teacher.py` run: the data fields of
    [`~hf_minitron.data.TextDataArguments`], then these.

    Args:
        teacher (`str`, *optional*, defaults to `"embedded"`): the teacher checkpoint, or `embedded`.
        teacher_dtype (`str`, *optional*): dtype the teacher is loaded in (`float32`, `bfloat16`); default: as saved.
        output_dir (`str`, *optional*, defaults to `"outputs/teacher_cache"`): the cache directory.
        split (`str`, *optional*, defaults to `"train"`): which split of the packed data to cache.
        mode (`str`, *optional*, defaults to `"hidden"`): `hidden` (exact), `topk` or `sampled`.
        top_k (`int`, *optional*): tokens per position for `mode=topk`.
        num_samples (`int`, *optional*): tokens drawn per position for `mode=sampled` (1 to 255).
        seed (`int`, *optional*, defaults to `0`): seed of the draws of `mode=sampled`.
        compress (`bool`, *optional*, defaults to `False`): `mode=topk` with log-probabilities quantised
            to `dtype` `uint8` or `uint16`, ids and codes compressed losslessly (zstd).
        dtype (`str`, *optional*, defaults to `"float32"`): storage dtype (see [`cache_teacher`]).
        temperature (`float`, *optional*, defaults to `1.0`): temperature of the top-k log-probabilities or of the
            sampled distributions.
        batch_size (`int`, *optional*, defaults to `8`): samples per teacher forward.
        shard_size (`int`, *optional*, defaults to `256`): samples per Arrow shard.
        overwrite (`bool`, *optional*, defaults to `False`): replace a cache made with other settings.
    """

    teacher: str = field(default="embedded", metadata={"help": "Teacher checkpoint, or 'embedded'."})
    teacher_dtype: str | None = field(
        default=None, metadata={"help": "dtype the teacher is loaded in (float32, bfloat16); default: as saved."}
    )
    output_dir: str = field(default="outputs/teacher_cache", metadata={"help": "The cache directory."})
    split: str = field(default="train", metadata={"help": "Split of the packed data to cache (train, validation)."})
    mode: str = field(default="hidden", metadata={"help": "What is stored.", "choices": list(MODES)})
    top_k: int | None = field(default=None, metadata={"help": "Tokens per position for mode=topk."})
    num_samples: int | None = field(default=None, metadata={"help": "Tokens drawn per position for mode=sampled."})
    seed: int = field(default=0, metadata={"help": "Seed of the draws of mode=sampled."})
    compress: bool = field(
        default=False,
        metadata={
            "help": "mode=topk: log-probabilities quantised to dtype uint8/uint16, ids and codes zstd-compressed."
        },
    )
    dtype: str = field(
        default="float32",
        metadata={"help": "Storage dtype.", "choices": list(STORAGE_DTYPES) + list(QUANTIZED_DTYPES)},
    )
    temperature: float = field(default=1.0, metadata={"help": "Temperature of the top-k log-probabilities."})
    batch_size: int = field(default=8, metadata={"help": "Samples per teacher forward."})
    shard_size: int = field(default=256, metadata={"help": "Samples per Arrow shard (the unit of resumption)."})
    overwrite: bool = field(default=False, metadata={"help": "Replace a cache made with other settings."})


def cache_teacher_checkpoint(args: CacheTeacherArguments):
    """Loads `args.teacher` and its tokenizer, packs the data and runs [`cache_teacher`]; one shard set per process
    under `accelerate launch`."""
    from accelerate import PartialState
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..embedded import resolve_model_path
    from ..io import check_not_overlapping, check_output_dir
    from ..validation import check_checkpoint, check_sequence_length, load_model_config

    state = PartialState()  # joins the launched processes (each writes its own shards)
    path = resolve_model_path(args.teacher)
    check_checkpoint(path)
    # Everything the teacher's config and the paths can tell fails here, before the weights and the data are read.
    check_not_overlapping(args.output_dir, path, "the teacher")
    # A file, a mount point or a folder hf-minitron did not write is refused now; our own output is left to
    # cache_teacher, which reuses a cache of the same settings or replaces it with --overwrite.
    check_output_dir(args.output_dir, overwrite=True)
    check_sequence_length(load_model_config(path), args.seq_length, "CacheTeacherArguments.seq_length")
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    kwargs = {} if args.teacher_dtype is None else {"dtype": getattr(torch, args.teacher_dtype)}
    teacher = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True, trust_remote_code=False, **kwargs)
    data = args.load_datasets(tokenizer)
    if args.split not in data:
        raise ValueError(f"CacheTeacherArguments.split={args.split!r} is not among the data's splits {list(data)}.")
    return cache_teacher(
        teacher.to(state.device),
        data[args.split],
        args.output_dir,
        mode=args.mode,
        top_k=args.top_k,
        num_samples=args.num_samples,
        seed=args.seed,
        compress=args.compress,
        dtype=args.dtype,
        temperature=args.temperature,
        tokenizer=tokenizer,
        batch_size=args.batch_size,
        shard_size=args.shard_size,
        overwrite=args.overwrite,
    )
