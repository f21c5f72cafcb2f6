"""The compressed top-k teacher cache (`cache_teacher(mode="topk", compress=True)`): quantised log-probabilities within
the stated error bound of the uncompressed cache, ids and codes compressed losslessly."""

import copy
import json

import numpy as np
import pytest
import torch
from conftest import tiny_model
from datasets import Dataset
from test_teacher_cache import _args, _cache, _dataset, _loss_and_grads, _snapshot, _student

import hf_minitron.distillation.teacher_cache_writer as teacher_cache_writer
from hf_minitron import DistillationTrainer, load_teacher_cache
from hf_minitron.distillation.teacher_cache import (
    COMPRESS_CODEC,
    QUANTIZED_LOG_PROB_MIN,
    CachedTeacher,
    decode_topk,
    dequantize_log_probs,
    encode_topk,
    id_bits,
    quantize_log_probs,
)
from hf_minitron.distillation.teacher_cache_format import metadata_hash
from hf_minitron.distillation.trainer import DataCollatorForDistillation


# Half a quantisation step, and the fp32 rounding of the dequantisation (a few ulps of |m|).
BOUND = {dtype: -QUANTIZED_LOG_PROB_MIN / (2 * (2**bits - 1)) for dtype, bits in (("uint8", 8), ("uint16", 16))}
FP32_ROUNDING = 4 * -QUANTIZED_LOG_PROB_MIN * 2**-24


@pytest.mark.parametrize("vocab", [96, 49152, 2**16, 2**16 + 1, 2**24 + 1])
@pytest.mark.parametrize("dtype", ["uint8", "uint16"])
def test_top_k_streams_round_trip(vocab, dtype):
    assert id_bits(vocab) == {96: 7, 49152: 16, 2**16: 16, 2**16 + 1: 17, 2**24 + 1: 25}[vocab]
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (13, 5), generator=generator)
    ids[0, 0] = vocab - 1
    # Rank-ordered (descending) log-probabilities, as top-k gives them; one row out of order and one beyond the
    # quantised range, which the modular differences must carry too.
    log_p = torch.rand(13, 5, generator=generator).mul(-30).sort(-1, descending=True).values
    log_p[3] = log_p[3].flip(0)
    codes = quantize_log_probs(log_p, dtype)
    rest = torch.rand(13, generator=generator).log().numpy()
    restored_ids, restored, restored_rest = decode_topk(encode_topk(ids, codes, rest, vocab), 13)
    assert torch.equal(restored_ids, ids) and torch.equal(restored_rest, torch.from_numpy(rest))
    assert torch.equal(restored, dequantize_log_probs(torch.from_numpy(codes.astype("int64")), dtype))


def test_top_k_codes_compress_and_ids_do_not_grow():
    # Log-probabilities falling with the rank: the differences between ranks are small, zstd codes them in a few
    # bits. Ids drawn uniformly carry 16 bits each: the blob must not grow beyond its header, zstd's framing and the
    # rest's 4 bytes per token (what a real teacher's ids gain is measured in benchmarks/cache_modes.py).
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 2**16, (256, 64), generator=generator)
    log_p = torch.linspace(-0.5, -12, 64).expand(256, 64) + torch.rand(256, 64, generator=generator) * 0.1
    log_p = log_p.sort(-1, descending=True).values
    rest = np.zeros(256, np.float32)
    uniform_ids = encode_topk(ids, np.zeros((256, 64), np.uint8), rest, 2**16)
    falling_codes = encode_topk(torch.zeros_like(ids), quantize_log_probs(log_p, "uint8"), rest, 2**16)
    assert len(uniform_ids) < 1.01 * ids.numel() * 2 + 4 * 256
    # Constant ids take next to nothing but their plain low bytes: what is left is the codes' stream.
    assert len(falling_codes) - ids.numel() - 4 * 256 < 0.5 * ids.numel()


def test_a_damaged_blob_is_refused():
    blob = encode_topk(torch.arange(12).reshape(3, 4), np.zeros((3, 4), np.uint8), np.zeros(3, np.float32), 96)
    with pytest.raises(ValueError, match="damaged"):
        decode_topk(blob, 5)
    with pytest.raises(ValueError, match="damaged"):
        decode_topk(blob[:1], 3)
    with pytest.raises(ValueError, match="damaged"):
        decode_topk(blob[:-1], 3)  # cut short: its terminator is gone
    with pytest.raises(ValueError, match="damaged"):
        decode_topk(blob[:-5] + blob[-1:], 3)
    with pytest.raises(ValueError, match="damaged"):
        decode_topk(blob[:30] + blob[-1:], 3)  # the frames gone, the header intact


def test_streams_survive_numpy_bytes_which_drop_trailing_nuls():
    # `datasets` formats a binary value as numpy.bytes_, which loses trailing NUL bytes: the terminator protects the
    # stream's own last bytes, whatever they are.
    ids = torch.zeros(4, 3, dtype=torch.long)
    blob = encode_topk(ids, np.zeros((4, 3), np.uint8), np.zeros(4, np.float32), 96)

    def as_formatted(blob):  # an element of a fixed-width bytes array, as `datasets` returns it
        return np.array([blob, b""])[0]

    assert as_formatted(b"ab\x00\x00") == b"ab"  # the loss it guards against
    restored_ids, restored, rest = decode_topk(as_formatted(blob), 4)
    assert torch.equal(restored_ids, ids) and restored.eq(QUANTIZED_LOG_PROB_MIN).all() and rest.eq(0).all()


@pytest.mark.parametrize("dtype", ["uint8", "uint16"])
def test_quantised_log_probs_are_within_half_a_step(dtype):
    log_p = torch.cat([torch.linspace(QUANTIZED_LOG_PROB_MIN, 0, 100_001), torch.tensor([-30.0, -1e4])])
    restored = dequantize_log_probs(torch.from_numpy(quantize_log_probs(log_p, dtype).astype("int64")), dtype)
    inside = log_p >= QUANTIZED_LOG_PROB_MIN
    assert (restored[inside] - log_p[inside]).abs().max() <= BOUND[dtype] + FP32_ROUNDING
    assert restored[~inside].eq(QUANTIZED_LOG_PROB_MIN).all() and restored.le(0).all()


@pytest.mark.parametrize("dtype", ["uint8", "uint16"])
def test_compressed_cache_is_the_top_k_cache_within_the_bound(tmp_path, dtype):
    teacher, data, k = tiny_model("llama"), _dataset(), 12
    exact = _cache(teacher, data, tmp_path / "exact", mode="topk", top_k=k)
    compressed = _cache(teacher, data, tmp_path / dtype, mode="topk", top_k=k, compress=True, dtype=dtype)
    outputs = []
    for cache in (exact, compressed):
        batch = DataCollatorForDistillation()([cache[i] for i in range(len(cache))])
        columns = CachedTeacher.pop_columns(batch)
        outputs.append(CachedTeacher.from_dataset(cache).forward(batch, columns, [], fused=True).topk)
    keep = batch["attention_mask"].reshape(-1).bool()
    (ids, log_p, rest), (packed_ids, quantised, packed_rest) = ((t[keep] for t in o) for o in outputs)
    assert torch.equal(packed_ids, ids) and torch.equal(packed_rest, rest)
    assert (quantised - log_p).abs().max() <= BOUND[dtype] + FP32_ROUNDING
    infos = {n: json.loads((tmp_path / n / "teacher_cache.json").read_text()) for n in ("exact", dtype)}
    assert infos[dtype]["compress"] == COMPRESS_CODEC
    # The rest's fp32 log-mass plus the streams, which cannot beat the information in a random tiny teacher's top-k
    # by much: at least a few bits per entry, and less than the raw ids and values.
    raw = k * (1 + {"uint8": 1, "uint16": 2}[dtype]) + 4
    assert 4 + k / 2 < infos[dtype]["teacher_bytes_per_token"] < raw
    assert infos[dtype]["teacher_bytes_per_token"] < infos["exact"]["teacher_bytes_per_token"] == k * 6 + 4


def test_samples_of_different_lengths_are_padded_like_the_raw_cache(tmp_path):
    # Unpacked text: a batch of samples of 16, 11 and 7 tokens, each blob decoded into its own rows.
    rows = [{k: v[:n] for k, v in row.items()} for row, n in zip(_dataset(n=3).to_list(), (16, 11, 7))]
    teacher, data = tiny_model("llama"), Dataset.from_list(rows)
    exact = _cache(teacher, data, tmp_path / "exact", mode="topk", top_k=5)
    compressed = _cache(teacher, data, tmp_path / "compressed", mode="topk", top_k=5, compress=True, dtype="uint16")
    batches = [DataCollatorForDistillation()([cache[i] for i in range(3)]) for cache in (exact, compressed)]
    assert torch.equal(batches[1]["teacher_topk_ids"].long(), batches[0]["teacher_topk_ids"])
    assert torch.equal(batches[1]["teacher_topk_rest"], batches[0]["teacher_topk_rest"])
    assert (
        batches[1]["teacher_topk_ids"][2, 7:].eq(0).all()
        and batches[1]["teacher_topk_quantized_logprobs"][2, 7:].eq(0).all()
    )
    assert batches[1]["teacher_topk_ids"][2, :7].ne(0).any()


@pytest.mark.parametrize("dtype", ["uint8", "uint16"])
def test_the_collator_ships_rank_differences_and_the_teacher_decodes_them_on_its_device(tmp_path, dtype):
    from hf_minitron.distillation.teacher_cache_format import decode_topk_batch

    teacher, data = tiny_model("llama"), _dataset()
    cache = _cache(teacher, data, tmp_path / dtype, mode="topk", top_k=12, compress=True, dtype=dtype)
    features = [cache[i] for i in range(len(cache))]
    batch = DataCollatorForDistillation()(features)
    steps = batch["teacher_topk_quantized_logprobs"]
    # One byte per uint8 value crosses to the device, not an fp32 log-probability; no log-probabilities yet.
    assert steps.dtype == (torch.uint8 if dtype == "uint8" else torch.int32) and "teacher_topk_logprobs" not in batch
    assert batch["teacher_topk_ids"].dtype == torch.int32  # widened to int64 on the device
    length = batch["input_ids"].shape[1]
    ids, log_probs, rest = decode_topk_batch(
        [(f["teacher_topk_packed"], len(f["input_ids"])) for f in features], length
    )
    columns = CachedTeacher.pop_columns(batch)
    got_ids, got_log_probs, got_rest = CachedTeacher.from_dataset(cache).forward(batch, columns, [], fused=True).topk
    assert torch.equal(got_ids, ids.reshape(-1, 12)) and torch.equal(got_log_probs, log_probs.reshape(-1, 12))
    assert torch.equal(got_rest, rest.reshape(-1))


def test_training_from_a_compressed_cache(tmp_path):
    teacher, data = tiny_model("llama"), _dataset()
    exact = _cache(teacher, data, tmp_path / "exact", mode="topk", top_k=16)
    compressed = _cache(teacher, data, tmp_path / "compressed", mode="topk", top_k=16, compress=True, dtype="uint16")
    losses = []
    for cache in (exact, compressed):
        student = _student()
        trainer = DistillationTrainer(model=student, args=_args(tmp_path / "o"), train_dataset=cache)
        losses.append(_loss_and_grads(trainer, student, [cache[i] for i in range(4)])[0])
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-3, atol=1e-4)
    student = _student()
    before = _snapshot(student)
    trainer = DistillationTrainer(model=student, args=_args(tmp_path / "train"), train_dataset=compressed)
    assert "compressed" in trainer.teacher_placement
    trainer.train()
    assert len([log for log in trainer.state.log_history if "kd_loss" in log]) == 2
    assert any(not torch.equal(p, before[n]) for n, p in student.named_parameters())


def test_compress_arguments_are_checked(tmp_path):
    teacher, data = tiny_model("llama"), _dataset()
    with pytest.raises(ValueError, match="compress=True is for mode='topk'"):
        _cache(teacher, data, tmp_path / "bad", compress=True, dtype="uint8")
    with pytest.raises(ValueError, match="pass dtype='uint8'"):
        _cache(teacher, data, tmp_path / "bad", mode="topk", top_k=4, compress=True)
    with pytest.raises(ValueError, match="dtype='uint8' is not supported"):
        _cache(teacher, data, tmp_path / "bad", mode="topk", top_k=4, dtype="uint8")
    _cache(teacher, data, tmp_path / "cache", mode="topk", top_k=4)
    with pytest.raises(ValueError, match="other settings .*compress"):
        _cache(teacher, data, tmp_path / "cache", mode="topk", top_k=4, compress=True, dtype="uint8")


# The earlier formats under the same columns: bit-packed ids, then the whole ids through zstd.
@pytest.mark.parametrize("earlier", [True, "zstd"])
def test_a_cache_in_an_earlier_format_is_refused(tmp_path, earlier):
    teacher, data = tiny_model("llama"), _dataset()
    cache = _cache(teacher, data, tmp_path / "cache", mode="topk", top_k=4, compress=True, dtype="uint8")
    path = tmp_path / "cache" / "teacher_cache.json"
    info = json.loads(path.read_text())
    info["compress"] = earlier  # as the earlier version wrote it, with its hash
    path.write_text(json.dumps(info | {"metadata_hash": metadata_hash(info)}))
    with pytest.raises(ValueError, match="earlier format .*overwrite"):
        CachedTeacher.from_dataset(cache)


def test_interrupted_compressed_write_resumes_to_the_same_cache_and_refuses_another_teacher(tmp_path, monkeypatch):
    teacher, data = tiny_model("llama"), _dataset(n=10)
    settings = dict(mode="topk", top_k=6, compress=True, dtype="uint8")
    reference = _cache(teacher, data, tmp_path / "reference", **settings)
    real, written = teacher_cache_writer._write_shard, []

    def dies_at_the_third_shard(*args, **kwargs):
        if len(written) == 2:
            raise KeyboardInterrupt
        written.append(args[2].name)
        return real(*args, **kwargs)

    monkeypatch.setattr(teacher_cache_writer, "_write_shard", dies_at_the_third_shard)
    with pytest.raises(KeyboardInterrupt):
        _cache(teacher, data, tmp_path / "cache", **settings)
    assert not (tmp_path / "cache").exists()
    monkeypatch.setattr(teacher_cache_writer, "_write_shard", real)
    cache = _cache(teacher, data, tmp_path / "cache", **settings)
    for i in range(len(data)):
        for column in cache.column_names:
            np.testing.assert_array_equal(cache[i][column], reference[i][column])
    corrected = copy.deepcopy(teacher)
    with torch.no_grad():
        corrected.model.layers[1].mlp.down_proj.weight.add_(1e-2)
    with pytest.raises(ValueError, match="another teacher"):
        load_teacher_cache(tmp_path / "cache", teacher=corrected)
    with pytest.raises(ValueError, match="other data"):
        load_teacher_cache(tmp_path / "cache", dataset=_dataset(seed=1))
