"""Local data files checked before `datasets` reads them.

`datasets`' builders read text as UTF-8: a file in another encoding fails deep inside them (a `DatasetGenerationError`
around a `UnicodeDecodeError`), a UTF-8 byte-order mark stays in the first document of a `.txt` file, and a JSON Lines
row whose text field is missing or not a string is dropped without a word. Here a file is read once first: text with a
byte-order mark (UTF-8, UTF-16, UTF-32) is decoded as the mark says; anything else that is not UTF-8 (Latin-1, UTF-16
without a mark, a binary file), a Parquet file without Parquet's magic bytes and a JSON Lines row without a string
text field are refused with an error naming the file, where it goes wrong and the fix.
"""

import codecs
import json
import os


# Longest first: UTF-32-LE's mark begins with UTF-16-LE's.
_BYTE_ORDER_MARKS = (
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)
_CHUNK = 1 << 20
# A stream is checked on its first bytes only: reading a corpus larger than the disk up front would defeat streaming.
STREAMING_CHECK_BYTES = 1 << 20


def _utf8_name(path: str, tag: str = "utf8") -> str:
    stem, suffix = os.path.splitext(path)
    return f"{stem}.{tag}{suffix}"


def file_encoding(path: str) -> str:
    """The codec of a local text file: the one its byte-order mark names, else `"utf-8"`."""
    with open(path, "rb") as f:
        start = f.read(4)
    return next((name for mark, name in _BYTE_ORDER_MARKS if start.startswith(mark)), "utf-8")


def _not_utf8(path: str, offset: int, bad: bytes, line: int) -> ValueError:
    return ValueError(
        f"Data file {path!r} is not UTF-8 text: the bytes {bad!r} at offset {offset} (line {line}) are not valid "
        f"UTF-8. Convert it to UTF-8, e.g. from Latin-1: `iconv -f latin1 -t utf-8 {path} > {_utf8_name(path)}` "
        "(from Windows-1252: -f cp1252), and pass the converted file; if it is not a text file, pass the text instead."
    )


def _check_json_line(path: str, number: int, line: str, text_column: str) -> None:
    if not line.strip():
        return
    try:
        row = json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(
            f"Line {number} of {path!r} is not valid JSON ({error}): a .jsonl file holds one JSON object per line. "
            "Fix or drop that line."
        ) from None
    if not isinstance(row, dict):
        raise ValueError(
            f"Line {number} of {path!r} holds a JSON {type(row).__name__}, not an object: a .jsonl file holds one "
            f'object per line, e.g. {{{json.dumps(text_column)}: "..."}}.'
        )
    value = row.get(text_column)
    if text_column not in row and number == 1:  # most likely the wrong field named, not a damaged row
        raise ValueError(
            f"Column {text_column!r} not found in {path!r} (columns: {list(row)}): pass the column that holds the "
            "text with --text-column."
        )
    # A null is no text, as an empty string is (both are skipped); a value of another type is text lost.
    if not isinstance(value, str) and not (value is None and text_column in row):
        kind = {bool: "boolean", int: "number", float: "number", list: "array", dict: "object"}
        what = "has no" if text_column not in row else f"has a {kind[type(value)]} in its"
        fields = ", ".join(map(repr, row)) or "none"
        raise ValueError(
            f"Line {number} of {path!r} {what} {text_column!r} field (its fields: {fields}): every line needs its "
            f"text as a string there, or that row would be dropped. Name the field that holds the text with "
            f"--text-column, or drop or fix such lines, e.g. `jq -c 'select(.{text_column}|type==\"string\")' "
            f"{path} > {_utf8_name(path, 'fixed')}`."
        )


def _check_text_file(path: str, encoding: str, json_lines: str | None, limit: int | None) -> None:
    """Decodes `path` with `encoding` (its first `limit` bytes), and checks every line of JSON Lines for a string
    `json_lines` field."""
    decoder = codecs.getincrementaldecoder(encoding)("strict")
    offset, newlines, lines, pending = 0, 0, 0, ""
    with open(path, "rb") as f:
        while limit is None or offset < limit:
            raw = f.read(_CHUNK)
            if offset == 0 and encoding == "utf-8" and b"\x00" in raw:
                raise ValueError(
                    f"Data file {path!r} holds NUL bytes (the first at offset {raw.index(0)}): it is a binary file, "
                    "or text in UTF-16 / UTF-32 without a byte-order mark. Pass UTF-8 text; to convert UTF-16 text: "
                    f"`iconv -f UTF-16LE -t UTF-8 {path} > {_utf8_name(path)}`."
                )
            try:
                text = decoder.decode(raw, final=not raw)
            except UnicodeDecodeError as error:
                start = offset - len(decoder.getstate()[0]) + error.start
                line = newlines + raw[: max(start - offset, 0)].count(b"\n") + 1
                raise _not_utf8(path, start, error.object[error.start : error.end], line) from None
            if json_lines is not None:
                *complete, pending = (pending + text).split("\n")
                for line in complete:
                    lines += 1
                    _check_json_line(path, lines, line, json_lines)
            if not raw:
                if json_lines is not None:
                    _check_json_line(path, lines + 1, pending, json_lines)
                return
            offset, newlines = offset + len(raw), newlines + raw.count(b"\n")


def check_local_files(paths: list[str], builder: str, text_column: str, streaming: bool = False) -> str | None:
    """Refuses local data files `datasets` would fail on or read wrongly (see the module docstring).

    Args:
        paths (`list[str]`): the files of one source, all of one kind.
        builder (`str`): `datasets`' builder for them: `"text"`, `"json"`, `"csv"` or `"parquet"`.
        text_column (`str`): the field every line of a `.jsonl` file must hold as a string.
        streaming (`bool`, *optional*, defaults to `False`): check only the first `STREAMING_CHECK_BYTES` of each
            file.

    Returns:
        `str` or `None`: the `encoding` to pass to the builder, `None` for UTF-8 (its default) or Parquet.

    Raises:
        `ValueError`: naming the file, what is wrong and the fix.
    """
    folders = [path for path in paths if not os.path.isfile(path)]
    if folders:
        raise ValueError(
            f"Data path(s) {folders} are folders, not files: pass the files in them, comma separated (e.g. "
            f"{os.path.join(folders[0], 'part-1.txt')},{os.path.join(folders[0], 'part-2.txt')})."
        )
    if builder == "parquet":
        for path in paths:
            with open(path, "rb") as f:
                start = f.read(4)
                f.seek(max(os.path.getsize(path) - 4, 0))
                end = f.read(4)
            if start != b"PAR1" or end != b"PAR1":
                raise ValueError(
                    f"Data file {path!r} is not a Parquet file (no PAR1 magic bytes at its start and end): it is "
                    "truncated, or another format named .parquet. Pass the file with its own extension (.txt, "
                    ".jsonl, .csv), or write it again as Parquet."
                )
        return None
    encodings = {path: file_encoding(path) for path in paths}
    for path, encoding in encodings.items():
        if builder == "json" and encoding in ("utf-16", "utf-32"):
            # `datasets` reads JSON in byte chunks cut at a newline byte, which splits UTF-16/32 characters.
            raise ValueError(
                f"Data file {path!r} is {encoding.upper()} text (it starts with that byte-order mark), which JSON is "
                f"not read in: convert it to UTF-8 with `iconv -f {encoding.upper()} -t UTF-8 {path} > "
                f"{_utf8_name(path)}` and pass the converted file."
            )
        json_lines = text_column if path.lower().endswith(".jsonl") else None
        _check_text_file(path, encoding, json_lines, STREAMING_CHECK_BYTES if streaming else None)
    # A UTF-8 byte-order mark is optional: "utf-8-sig" reads files with and without one.
    kinds = set(encodings.values()) - ({"utf-8"} if "utf-8-sig" in encodings.values() else set())
    if len(kinds) > 1:
        listing = ", ".join(f"{path!r}: {encoding}" for path, encoding in encodings.items())
        raise ValueError(
            f"The data files of one source are in different encodings ({listing}): convert them all to UTF-8, e.g. "
            "`iconv -f UTF-16 -t UTF-8 FILE > FILE.utf8`, and pass the converted files."
        )
    encoding = kinds.pop()
    return None if encoding == "utf-8" else encoding


def named_decode_errors(source: str, texts):
    """`texts`, a stream of `source`, with a decoding error met past the start [`check_local_files`] read (streaming
    checks only `STREAMING_CHECK_BYTES`) raised as one naming the source and the fix."""
    try:
        yield from texts
    except UnicodeDecodeError as error:
        raise ValueError(
            f"Data source {source!r} holds bytes that are not {error.encoding} past its first {STREAMING_CHECK_BYTES} "
            f"bytes (the ones checked before streaming): {error.reason}. Convert it to UTF-8, e.g. from Latin-1: "
            "`iconv -f latin1 -t utf-8 FILE > FILE.utf8.txt`, and pass the converted file."
        ) from None
