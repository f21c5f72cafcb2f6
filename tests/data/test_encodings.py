"""Local data files in other encodings, binary files and malformed JSON Lines (`hf_minitron.data.local_files`): read
correctly when a byte-order mark says how, otherwise refused before `datasets` reads them, with an error naming the
file, the problem and the fix."""

import json

import pytest

from hf_minitron.data import load_text_datasets, load_texts, stream_texts


DOCS = ["Première ligne: café", "Second line, naïve", "Third line"]


def _jsonl(encoding, rows=None):
    rows = [{"text": d} for d in DOCS] if rows is None else rows
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode(encoding)


def _csv(encoding):
    return ("text\n" + "".join(f'"{d}"\n' for d in DOCS)).encode(encoding)


def _write(tmp_path, name, data):
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


# ---------------------------------------------------------------------------------------------- read correctly
@pytest.mark.parametrize(
    "name, data",
    [
        ("utf8-bom.txt", "\n".join(DOCS).encode("utf-8-sig")),  # the mark stayed in the first document
        ("utf16.txt", "\n".join(DOCS).encode("utf-16")),  # little-endian, with its mark
        ("utf16be.txt", "\ufeff".encode("utf-16-be") + "\n".join(DOCS).encode("utf-16-be")),
        ("utf32.txt", "\n".join(DOCS).encode("utf-32")),
        ("utf16.csv", _csv("utf-16")),
    ],
)
def test_text_with_a_byte_order_mark_is_decoded(tmp_path, name, data):
    assert load_texts(_write(tmp_path, name, data)) == DOCS


def test_utf16_text_streams_decoded(tmp_path):
    assert list(stream_texts(_write(tmp_path, "utf16.txt", "\n".join(DOCS).encode("utf-16")))) == DOCS


def test_utf8_mark_in_json_lines_and_csv_is_read(tmp_path):
    """Read correctly before these checks too (`datasets` strips it); kept so, now that the mark is passed on."""
    assert load_texts(_write(tmp_path, "bom.jsonl", _jsonl("utf-8-sig"))) == DOCS
    assert load_texts(_write(tmp_path, "bom.csv", _csv("utf-8-sig"))) == DOCS


def test_files_with_and_without_a_utf8_mark_mix(tmp_path):
    plain = _write(tmp_path, "plain.txt", "\n".join(DOCS).encode())
    marked = _write(tmp_path, "marked.txt", "\n".join(DOCS).encode("utf-8-sig"))
    assert load_texts(f"{plain},{marked}") == DOCS + DOCS


# ---------------------------------------------------------------------------------------------- refused
def _refused(source, *words, streaming=False):
    with pytest.raises(ValueError) as error:
        if streaming:
            next(stream_texts(source))
        else:
            load_texts(source)
    message = str(error.value)
    for word in (source.split(",")[-1], *words):
        assert word in message, message
    return message


@pytest.mark.parametrize(
    "name, data",
    [
        ("latin1.txt", "\n".join(DOCS).encode("latin-1")),
        ("latin1.jsonl", _jsonl("latin-1")),
        ("latin1.csv", _csv("latin-1")),
        ("cp1252.txt", "“quoted” – dash\n".encode("cp1252")),
    ],
)
def test_latin1_is_refused_with_the_conversion(tmp_path, name, data):
    message = _refused(_write(tmp_path, name, data), "not UTF-8", "iconv -f latin1 -t utf-8")
    assert "offset" in message and "line" in message


def test_latin1_past_the_first_megabyte_is_found(tmp_path):
    data = b"plain ascii line\n" * 70_000 + "café\n".encode("latin-1")
    assert "line 70001" in _refused(_write(tmp_path, "late.txt", data), "not UTF-8")


def test_latin1_past_the_checked_start_of_a_stream_is_named(tmp_path):
    """Streaming checks the first megabyte only: a later bad byte is found as the stream reaches it."""
    path = _write(tmp_path, "late.txt", b"plain ascii line\n" * 70_000 + "café\n".encode("latin-1"))
    with pytest.raises(ValueError, match="late.txt.*not utf-8 past its first.*iconv -f latin1"):
        list(stream_texts(path))


def test_latin1_is_refused_before_streaming(tmp_path):
    _refused(_write(tmp_path, "latin1.txt", "\n".join(DOCS).encode("latin-1")), "not UTF-8", streaming=True)


@pytest.mark.parametrize(
    "name, data",
    [
        ("utf16-no-mark.txt", "\n".join(DOCS).encode("utf-16-le")),
        ("binary.txt", bytes(range(256)) * 4),
        ("image.txt", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(64)),
        ("binary.jsonl", b"\x00\x01\x02" * 50),
    ],
)
def test_binary_files_are_refused(tmp_path, name, data):
    _refused(_write(tmp_path, name, data), "NUL bytes", "iconv -f UTF-16LE -t UTF-8")


def test_utf16_json_lines_are_refused_with_the_conversion(tmp_path):
    _refused(_write(tmp_path, "utf16.jsonl", _jsonl("utf-16")), "UTF-16", "iconv -f UTF-16 -t UTF-8")


def test_not_parquet_is_refused(tmp_path):
    _refused(_write(tmp_path, "data.parquet", b"text,not parquet\n"), "not a Parquet file")


def test_files_of_different_encodings_are_refused(tmp_path):
    plain = _write(tmp_path, "plain.txt", "\n".join(DOCS).encode())
    wide = _write(tmp_path, "wide.txt", "\n".join(DOCS).encode("utf-16"))
    _refused(f"{plain},{wide}", "different encodings", "utf-16")


@pytest.mark.parametrize(
    "row, words",
    [
        ({"content": "d e f"}, ["has no 'text' field", "'content'"]),
        ({"text": 42}, ["number"]),
        ({"text": ["a", "b"]}, ["array"]),
    ],
)
def test_json_lines_without_a_string_text_are_refused(tmp_path, row, words):
    """Such a row was dropped without a word (or a whole column of numbers refused as 'no text')."""
    rows = [{"text": "a b c"}, row, {"text": "g h i"}]
    _refused(_write(tmp_path, "rows.jsonl", _jsonl("utf-8", rows)), "Line 2", "--text-column", *words)


def test_json_lines_with_a_broken_line_are_refused(tmp_path):
    data = b'{"text": "a b c"}\n{"text": "d e\n{"text": "g h i"}\n'
    _refused(_write(tmp_path, "broken.jsonl", data), "Line 2", "not valid JSON")


def test_the_training_loader_refuses_before_tokenizing(tmp_path, tokenizer):
    path = _write(tmp_path, "latin1.txt", "\n".join(DOCS * 50).encode("latin-1"))
    with pytest.raises(ValueError, match="iconv -f latin1"):
        load_text_datasets(path, tokenizer, seq_length=8)


def test_a_folder_named_like_a_file_is_refused(tmp_path):
    folder = tmp_path / "corpus.txt"
    folder.mkdir()
    (folder / "part.txt").write_text("some text\n")
    _refused(str(folder), "are folders, not files")
