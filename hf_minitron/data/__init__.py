"""Data: the offline corpora, tokenization + packing, and calibration batches.

The embedded corpus is the reference documentation that ships with CPython (`pydoc_data.topics`): real English
technical prose, available on every machine without a download. The `stdlib` corpus is the source code of the
standard library of the running Python: 12 MB of code, as much in distribution for a code-trained model (SmolLM2) as
any text on this machine, for a longer distillation than the demo's.
"""

import itertools
import logging
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, fields

import torch

from .local_files import check_local_files, named_decode_errors


logger = logging.getLogger(__name__)


def load_embedded_corpus(validation_fraction: float = 0.1) -> dict[str, list[str]]:
    """The Python reference topics as `{"train": [...], "validation": [...]}` lists of documents.

    The split is deterministic (by sorted topic name) so every run and every process sees the same data.
    """
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    names = sorted(topics)
    # Every k-th topic goes to validation: a stable split spread over the whole alphabet (not one contiguous block).
    step = max(2, round(1 / validation_fraction))
    validation = [topics[n].strip() for i, n in enumerate(names) if i % step == step // 2]
    train = [topics[n].strip() for i, n in enumerate(names) if i % step != step // 2]
    return {"train": train, "validation": validation}


STDLIB_CORPUS = "stdlib"
# Test suites, generated codec tables, and pydoc_data (the embedded corpus itself, and the source of the pydoc_topics
# task: held out of a corpus we distil on and then evaluate with).
_STDLIB_SKIPPED = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test", "encodings"}
_STDLIB_SKIPPED |= {"pydoc_data", "ensurepip", "lib2to3"}


def _stdlib_modules() -> dict:
    """`{dotted module name: path}` of the standard library's `.py` files, less `_STDLIB_SKIPPED`."""
    import sysconfig
    from pathlib import Path

    root = Path(sysconfig.get_paths()["stdlib"])
    modules = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root).with_suffix("").parts
        if not any(part in _STDLIB_SKIPPED or part.startswith("test_") for part in parts):
            modules[".".join(parts)] = path
    return modules


def load_stdlib_corpus(validation_fraction: float = 0.05) -> dict[str, list[str]]:
    """The source of this Python's standard library as `{"train": [...], "validation": [...]}`, one document per
    module (`.py` file), without test suites, codec tables and `pydoc_data`.

    The split is by module and deterministic: a module is held out when the SHA-1 of its dotted name (`json.decoder`)
    falls in the lowest `validation_fraction` of the hash range, so no validation module is trained on and the same
    Python always gives the same split. Documents are ordered by that hash, so any prefix of the training split (e.g.
    `max_train_samples`) mixes packages instead of taking them alphabetically.
    """
    import hashlib

    if not 0 < validation_fraction < 1:
        raise ValueError(f"validation_fraction={validation_fraction} is invalid: use a fraction in (0, 1).")

    def position(name: str) -> float:
        return int(hashlib.sha1(name.encode()).hexdigest()[:12], 16) / 16**12

    corpus = {"train": [], "validation": []}
    modules = _stdlib_modules()
    for name in sorted(modules, key=position):
        text = modules[name].read_text(encoding="utf-8", errors="replace").strip()
        if text:
            corpus["validation" if position(name) < validation_fraction else "train"].append(text)
    return corpus


def _check_packing(tokenizer, seq_length: int) -> int:
    if seq_length <= 1:
        raise ValueError(f"seq_length={seq_length} is invalid: use at least 2 tokens per sample.")
    if tokenizer.eos_token_id is None:
        raise ValueError(
            "The tokenizer has no eos_token_id, which packing uses as a separator: set tokenizer.eos_token."
        )
    return tokenizer.eos_token_id


def iter_blocks(texts: Iterable[str], tokenizer, seq_length: int) -> Iterator[list[int]]:
    """Yields `seq_length`-token blocks of `texts`, tokenized and joined with EOS separators, as they come: the
    packing of [`pack_texts`] for a stream that does not fit in memory. The incomplete tail is dropped."""
    eos = _check_packing(tokenizer, seq_length)
    # A tokenizer that starts every text with BOS (Gemma) expects it: Gemma-3-270M's loss on the embedded corpus is
    # 7.37 without it and 3.87 with it. Each block then starts with BOS, as the model saw in training.
    bos = tokenizer.bos_token_id
    prefix = [bos] if bos is not None and tokenizer("a")["input_ids"][:1] == [bos] else []
    length = seq_length - len(prefix)
    buffer: list[int] = []
    for text in texts:
        buffer.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        buffer.append(eos)
        while len(buffer) >= length:
            yield prefix + buffer[:length]
            buffer = buffer[length:]


def pack_texts(texts: Iterable[str], tokenizer, seq_length: int, max_samples: int | None = None):
    """Tokenizes `texts`, joins them with EOS separators and cuts the stream into `seq_length` blocks.

    Returns a `datasets.Dataset` with `input_ids` and `attention_mask` columns (no padding: every block is full;
    the incomplete tail is dropped).
    """
    from datasets import Dataset

    blocks = list(itertools.islice(iter_blocks(texts, tokenizer, seq_length), max_samples))
    if not blocks:
        raise ValueError(
            f"The texts hold fewer than seq_length={seq_length} tokens, so no sample could be packed: pass more text "
            "or a smaller seq_length."
        )
    return Dataset.from_dict({"input_ids": blocks, "attention_mask": [[1] * seq_length for _ in blocks]})


def embedded_datasets(tokenizer, seq_length: int = 256, max_train_samples: int | None = None):
    """Packed train/validation `datasets.Dataset`s from the embedded corpus."""
    corpus = load_embedded_corpus()
    return {
        "train": pack_texts(corpus["train"], tokenizer, seq_length, max_train_samples),
        "validation": pack_texts(corpus["validation"], tokenizer, seq_length),
    }


# ---------------------------------------------------------------------------------------------- calibration batches
def _as_row(sample) -> dict:
    # Any mapping: a dict, a datasets row, or a tokenizer's own output (`BatchEncoding`).
    if not isinstance(sample, Mapping) or "input_ids" not in sample:
        raise ValueError(
            "Calibration samples must be mappings with an 'input_ids' entry (and optionally 'attention_mask'), got "
            f"{type(sample).__name__}. Tokenize your text first, e.g. with hf_minitron.data.pack_texts."
        )
    ids = torch.as_tensor(sample["input_ids"])
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise ValueError(
            f"input_ids hold {str(ids.dtype).replace('torch.', '')} values: token ids must be integers (a float "
            "tensor would be truncated silently). Pass the tokenizer's output as it is, or cast with .long()."
        )
    ids = ids.long()
    mask = sample.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else torch.as_tensor(mask)
    if mask.shape != ids.shape:
        raise ValueError(
            f"attention_mask has shape {tuple(mask.shape)} but input_ids has shape {tuple(ids.shape)}: the mask needs "
            "one 0/1 entry per token. Pass the attention_mask the tokenizer returned with these input_ids."
        )
    if mask.numel() and not bool(((mask == 0) | (mask == 1)).all()):
        bad = sorted({float(v) for v in mask[(mask != 0) & (mask != 1)].unique()[:3]})
        raise ValueError(
            f"attention_mask holds values {bad}: it must be 0 (padding) or 1 (token). Pass the tokenizer's mask."
        )
    return {"input_ids": ids, "attention_mask": mask.long()}


def check_token_ids(samples: list[dict], vocab_size: int) -> None:
    """Raises if a token id is outside `[0, vocab_size)`: the embedding lookup would fail deep inside torch (an
    IndexError on the CPU, a device-side assert on a GPU). Padded positions count too: the embedding looks them up."""
    for i, sample in enumerate(samples):
        ids = sample["input_ids"]
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
            bad = int(ids.min()) if int(ids.min()) < 0 else int(ids.max())
            raise ValueError(
                f"Calibration sample {i} holds token id {bad}, outside the model's vocabulary [0, {vocab_size}): the "
                "data was tokenized with another tokenizer. Tokenize it with this model's tokenizer."
            )


def _collate(rows: list[dict], pad_token_id: int = 0) -> dict:
    length = max(r["input_ids"].shape[-1] for r in rows)
    ids = torch.full((len(rows), length), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, r in enumerate(rows):
        n = r["input_ids"].shape[-1]
        ids[i, :n] = r["input_ids"]
        mask[i, :n] = r["attention_mask"]
    return {"input_ids": ids, "attention_mask": mask}


def iter_samples(data) -> Iterator[dict]:
    """Yields single samples (1-D `input_ids`) from a dataset, a list of samples, an iterable of batches, or one batch
    (e.g. `tokenizer(texts, return_tensors="pt", padding=True)`)."""
    if isinstance(data, Mapping):
        data = [data]  # iterating a mapping would yield its keys
    for item in data:
        row = _as_row(item)
        if row["input_ids"].dim() == 2:  # an already-batched item (e.g. from a DataLoader)
            for ids, mask in zip(row["input_ids"], row["attention_mask"]):
                yield {"input_ids": ids, "attention_mask": mask}
        elif row["input_ids"].dim() == 1:
            yield row
        else:
            raise ValueError(
                f"input_ids must be 1-D (a sample) or 2-D (a batch), got shape {tuple(row['input_ids'].shape)}."
            )


def take_samples(data, num_samples: int, vocab_size: int | None = None) -> list[dict]:
    """The first `num_samples` samples of `data` (fewer if the data is shorter); raises if there are none, or if a
    token id is outside `[0, vocab_size)`."""
    samples = []
    for row in iter_samples(data):
        if int(row["attention_mask"].sum()) == 0:
            continue
        samples.append(row)
        if len(samples) >= num_samples:
            break
    if not samples:
        raise ValueError(
            "The calibration data is empty (or every sample is fully masked): pass at least one tokenized sample."
        )
    if vocab_size is not None:
        check_token_ids(samples, vocab_size)
    return samples


def shard_batches(samples: list[dict], batch_size: int, rank: int = 0, world_size: int = 1) -> list[dict]:
    """Batches of this process's share of `samples` (sample i goes to process i % world_size)."""
    mine = samples[rank::world_size]
    return [_collate(mine[i : i + batch_size]) for i in range(0, len(mine), batch_size)]


def num_batches(num_samples: int, batch_size: int) -> int:
    return math.ceil(num_samples / batch_size)


# ---------------------------------------------------------------------------------------------- text sources
EMBEDDED_CORPUS = "embedded"
_LOCAL_FORMATS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def _open_source(source: str, split: str, text_column: str, streaming: bool = False):
    """A `datasets.Dataset` (or, streaming, an `IterableDataset`) of local files or a Hub dataset, its text column
    checked."""
    import os

    from datasets import load_dataset

    paths = [p for p in source.split(",") if p]
    missing = [p for p in paths if not os.path.exists(p)]
    # A file name that does not exist would otherwise be looked up as a Hub dataset, and fail as "unreachable".
    local = [p for p in missing if os.path.splitext(p)[1].lower() in _LOCAL_FORMATS or p.startswith((".", "~", "/"))]
    if local or (missing and len(missing) < len(paths)):
        raise FileNotFoundError(
            f"Data file(s) {local or missing} of {source!r} do not exist: pass existing local files (comma separated), "
            f"{EMBEDDED_CORPUS!r}, or a Hub dataset name."
        )
    if not missing:
        suffixes = {os.path.splitext(p)[1].lower() for p in paths}
        if len(suffixes) != 1 or next(iter(suffixes)) not in _LOCAL_FORMATS:
            raise ValueError(
                f"Unsupported local data files {paths}: use one kind of {sorted(_LOCAL_FORMATS)} files per source."
            )
        empty = [p for p in paths if os.path.getsize(p) == 0]
        if empty:
            raise ValueError(f"Data file(s) {empty} are empty: pass files that hold text.")
        builder = _LOCAL_FORMATS[suffixes.pop()]
        encoding = check_local_files(paths, builder, text_column, streaming)
        # UTF-8 files keep the builder's defaults (and `datasets`' cache of them); others are read as their mark says.
        options = {} if encoding is None else {"encoding": encoding}
        dataset = load_dataset(builder, data_files=paths, split="train", streaming=streaming, **options)
    else:
        try:
            dataset = load_dataset(source, split=split, streaming=streaming)
        except (ConnectionError, FileNotFoundError) as error:  # datasets' DatasetNotFoundError is a FileNotFoundError
            raise FileNotFoundError(
                f"Could not load the dataset {source!r}: it is not a local file, and as a Hub dataset it failed "
                f"({type(error).__name__}: {error}). Pass existing local .txt/.jsonl/.parquet/.csv files, "
                f"{EMBEDDED_CORPUS!r}, or a Hub dataset reachable from here (HF_DATASETS_OFFLINE unset)."
            ) from None
    # A stream of json files may not know its columns until the first row is read.
    columns = dataset.column_names or list(next(named_decode_errors(source, dataset), {}))
    if text_column not in columns:
        raise ValueError(
            f"Column {text_column!r} not found in {source!r} (columns: {columns}): pass the column that holds the "
            "text with --text-column."
        )
    return dataset


def load_texts(source: str = EMBEDDED_CORPUS, split: str = "train", text_column: str = "text") -> list[str]:
    """Documents from the embedded corpus (`"embedded"`), the standard library's source (`"stdlib"`), local
    text/jsonl/parquet/csv files, or a Hub dataset name.

    Local files are read with `datasets`' packaged builders; a `.txt` file gives one document per line.
    """
    if source in (EMBEDDED_CORPUS, STDLIB_CORPUS):
        corpus = load_embedded_corpus() if source == EMBEDDED_CORPUS else load_stdlib_corpus()
        if split not in corpus:
            raise ValueError(f"The {source} corpus has splits {list(corpus)}, not {split!r}.")
        return corpus[split]
    dataset = _open_source(source, split, text_column)
    texts = [t for t in dataset[text_column] if isinstance(t, str) and t.strip()]
    if not texts:
        raise ValueError(
            f"Column {text_column!r} of {source!r} holds no non-empty text ({len(dataset)} rows): pass data with text "
            "in that column, or name the column that holds it with --text-column."
        )
    return texts


def stream_texts(source: str, text_column: str = "text", skip: int = 0) -> Iterator[str]:
    """The non-empty documents of a large source read lazily (`datasets` streaming): nothing is downloaded or
    loaded up front, so a corpus far larger than memory (or disk) can be trained on."""
    dataset = _open_source(source, "train", text_column, streaming=True)
    texts = named_decode_errors(source, (row[text_column] for row in dataset))
    return itertools.islice((t for t in texts if isinstance(t, str) and t.strip()), skip, None)


def _stream_blocks(source: str, text_column: str, skip: int, tokenizer, seq_length: int) -> Iterator[dict]:
    for block in iter_blocks(stream_texts(source, text_column, skip), tokenizer, seq_length):
        yield {"input_ids": block, "attention_mask": [1] * seq_length}


def load_text_datasets(
    source: str,
    tokenizer,
    seq_length: int,
    text_column: str = "text",
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    streaming: bool = False,
    streaming_validation_documents: int = 64,
) -> dict:
    """Packed `{"train": ..., "validation": ...}` datasets from any text source: the one loader of every training stage.

    The offline corpora (`"embedded"`, `"stdlib"`) keep their own validation splits. Other sources (local files, or the `train` split of a Hub
    dataset) hold out their first 5% of documents (at least one), so every run and every process sees the same split
    and no validation document is trained on.

    Args:
        source (`str`): `"embedded"`, local text/jsonl/parquet/csv files (comma separated), or a Hub dataset name.
        tokenizer (`PreTrainedTokenizerBase`): Tokenizes the text; its EOS token separates documents.
        seq_length (`int`): Tokens per packed sample.
        text_column (`str`, *optional*, defaults to `"text"`): Column holding the text.
        max_train_samples (`int`, *optional*): Cap on packed training samples.
        max_eval_samples (`int`, *optional*): Cap on packed validation samples.
        streaming (`bool`, *optional*, defaults to `False`): For corpora too large to load: `train` becomes a
            `datasets.IterableDataset` that reads, tokenizes and packs documents as training consumes them (the
            Trainer then needs `max_steps`). The first `streaming_validation_documents` documents are held out.
        streaming_validation_documents (`int`, *optional*, defaults to `64`): Documents held out when streaming.

    Returns:
        `dict[str, datasets.Dataset]`: `train`, and `validation` unless the source has a single document or its
        held-out documents are shorter than `seq_length` tokens (logged).
    """
    for name, value in (("max_train_samples", max_train_samples), ("max_eval_samples", max_eval_samples)):
        if value is not None and value <= 0:
            raise ValueError(f"{name}={value} is invalid: use a positive integer, or None for no cap.")
    if streaming:
        return _streaming_datasets(
            source,
            tokenizer,
            seq_length,
            text_column,
            max_train_samples,
            max_eval_samples,
            streaming_validation_documents,
        )
    if source in (EMBEDDED_CORPUS, STDLIB_CORPUS):
        train_texts, eval_texts = load_texts(source, "train"), load_texts(source, "validation")
    else:
        texts = load_texts(source, "train", text_column)
        cut = max(1, len(texts) // 20) if len(texts) > 1 else 0
        train_texts, eval_texts = texts[cut:], texts[:cut]
    data = {"train": pack_texts(train_texts, tokenizer, seq_length, max_train_samples)}
    if eval_texts:
        try:
            data["validation"] = pack_texts(eval_texts, tokenizer, seq_length, max_eval_samples)
        except ValueError:
            # A held-out split is a bonus (evaluation during training, held-out loss), not a reason to stop.
            logger.warning(
                "The %d held-out document(s) of %r hold fewer than seq_length=%d tokens: no validation split.",
                len(eval_texts),
                source,
                seq_length,
            )
    return data


def check_streaming_steps(streaming: bool, max_steps: int, where: str) -> None:
    """A streamed training set has no length, so the Trainer cannot derive a step count from epochs."""
    if streaming and (max_steps is None or max_steps <= 0):
        raise ValueError(
            f"{where}: streaming=true needs max_steps > 0 (a stream has no length, so epochs cannot be counted): set "
            "max_steps in the training section, e.g. --max_steps 1000."
        )


def _streaming_datasets(source, tokenizer, seq_length, text_column, max_train, max_eval, validation_documents) -> dict:
    from datasets import IterableDataset

    if source == EMBEDDED_CORPUS:
        raise ValueError(
            f"streaming=True is for large local or Hub corpora; the {EMBEDDED_CORPUS!r} corpus is small and already "
            "in memory: set streaming to false."
        )
    if not isinstance(validation_documents, int) or validation_documents < 0:
        raise ValueError(
            f"streaming_validation_documents={validation_documents!r} is invalid: use a number of documents >= 0."
        )
    _check_packing(tokenizer, seq_length)
    # One document more than the held-out ones tells whether anything is left to train on.
    head = list(itertools.islice(stream_texts(source, text_column), validation_documents + 1))
    if len(head) <= validation_documents:
        raise ValueError(
            f"{source!r} holds only {len(head)} document(s), and streaming holds out the first "
            f"streaming_validation_documents={validation_documents}: nothing is left to train on. Lower "
            "streaming_validation_documents, or set streaming to false for data this small."
        )
    held_out = head[:validation_documents]
    # The generator re-opens the stream on every pass (epoch), after the held-out documents.
    train = IterableDataset.from_generator(
        _stream_blocks,
        gen_kwargs={
            "source": source,
            "text_column": text_column,
            "skip": len(held_out),
            "tokenizer": tokenizer,
            "seq_length": seq_length,
        },
    )
    if max_train is not None:
        train = train.take(max_train)
    data = {"train": train}
    if held_out:
        try:
            data["validation"] = pack_texts(held_out, tokenizer, seq_length, max_eval)
        except ValueError:
            logger.warning("The %d held-out streamed document(s) are too short: no validation split.", len(held_out))
    return data


@dataclass
class TextDataArguments:
    """The training text of a stage (distillation, teacher correction): where it comes from and how it is packed.

    Args:
        dataset (`str`, *optional*, defaults to `"embedded"`): `embedded` (the offline corpus), local
            text/jsonl/parquet/csv files (comma separated), or a Hub dataset name; split into train and validation
            by [`load_text_datasets`].
        text_column (`str`, *optional*, defaults to `"text"`): column holding the text.
        seq_length (`int`, *optional*, defaults to `512`): packed sample length in tokens.
        max_train_samples (`int`, *optional*): cap on the number of packed training samples.
        streaming (`bool`, *optional*, defaults to `False`): read, tokenize and pack a large corpus lazily instead of
            loading it (needs `max_steps`); the first `streaming_validation_documents` documents are held out.
        streaming_validation_documents (`int`, *optional*, defaults to `64`): documents held out when streaming.
    """

    dataset: str = field(
        default=EMBEDDED_CORPUS,
        metadata={"help": "'embedded', local .txt/.jsonl/.parquet/.csv files (comma separated), or a Hub dataset."},
    )
    text_column: str = field(default="text", metadata={"help": "Column holding the text."})
    seq_length: int = field(default=512, metadata={"help": "Packed sample length in tokens."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Cap on packed training samples."})
    streaming: bool = field(
        default=False, metadata={"help": "Stream a large corpus (read and packed lazily; needs max_steps)."}
    )
    streaming_validation_documents: int = field(
        default=64, metadata={"help": "Documents held out for validation when streaming."}
    )

    def __post_init__(self):
        from ..validation import check_numbers

        check_numbers(self)

    def data_settings(self) -> dict:
        """The fields that decide which samples a run trains on (recorded with its resumable checkpoints)."""
        return {f.name: getattr(self, f.name) for f in fields(TextDataArguments)}

    def check_steps(self, max_steps: int) -> None:
        check_streaming_steps(self.streaming, max_steps, f"{type(self).__name__}.streaming")

    def load_datasets(self, tokenizer) -> dict:
        """[`load_text_datasets`] with these arguments."""
        return load_text_datasets(
            self.dataset,
            tokenizer,
            self.seq_length,
            self.text_column,
            max_train_samples=self.max_train_samples,
            streaming=self.streaming,
            streaming_validation_documents=self.streaming_validation_documents,
        )
