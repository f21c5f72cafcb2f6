"""The compressed top-k teacher cache (`cache_teacher(mode="topk", compress=True)`): bit-packed ids and quantised
log-probabilities, within the stated error bound of the uncompressed cache."""

import json

import pytest
import torch
from conftest import VOCAB_SIZE, tiny_model
from test_teacher_cache import _args, _cache, _dataset, _loss_and_grads, _snapshot, _student

from hf_minitron import DistillationTrainer
from hf_minitron.distillation.teacher_cache import (
    QUANTIZED_LOG_PROB_MIN,
    CachedTeacher,
    dequantize_log_probs,
    id_bits,
    pack_ids,
    quantize_log_probs,
    unpack_ids,
)
from hf_minitron.distillation.trainer import DataCollatorForDistillation


# Half a quantisation step, and the fp32 rounding of the dequantisation (a few ulps of |m|).
BOUND = {dtype: -QUANTIZED_LOG_PROB_MIN / (2 * (2**bits - 1)) for dtype, bits in (("uint8", 8), ("uint16", 16))}
FP32_ROUNDING = 4 * -QUANTIZED_LOG_PROB_MIN * 2**-24


@pytest.mark.parametrize("vocab", [96, 49152, 2**16, 2**16 + 1])
def test_ids_round_trip_through_the_bit_stream(vocab):
    assert id_bits(vocab) == {96: 7, 49152: 16, 2**16: 16, 2**16 + 1: 17}[vocab]
    ids = torch.randint(0, vocab, (13, 5), generator=torch.Generator().manual_seed(0))
    ids[0, 0] = vocab - 1
    packed = pack_ids(ids, id_bits(vocab))
    assert packed.nbytes == -(-ids.numel() * id_bits(vocab) // 8)
    padded = torch.cat([torch.from_numpy(packed), torch.zeros(3, dtype=torch.uint8)])  # as the collator pads
    assert torch.equal(unpack_ids(padded, id_bits(vocab), ids.numel()).reshape(13, 5), ids)


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
    value_bytes = {"uint8": 1, "uint16": 2}[dtype]
    # Exactly: K ids of ceil(log2(96)) = 7 bits, K quantised values, the rest's fp32 log-mass (a byte-aligned stream
    # per sample adds under a byte per sample).
    payload = k * (id_bits(VOCAB_SIZE) / 8 + value_bytes) + 4
    assert payload <= infos[dtype]["teacher_bytes_per_token"] <= payload + 1 / 10
    assert infos[dtype]["teacher_bytes_per_token"] < infos["exact"]["teacher_bytes_per_token"] == k * 6 + 4


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
