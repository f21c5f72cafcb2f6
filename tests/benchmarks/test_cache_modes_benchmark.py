"""The cache-modes benchmark's memoised teacher gives the teacher's own outputs, and its verdicts follow the numbers."""

import sys

import torch
from conftest import ROOT, random_samples, tiny_model


sys.path.insert(0, str(ROOT / "benchmarks"))
import cache_modes  # noqa: E402


def test_memoized_teacher_returns_the_teachers_outputs():
    teacher = tiny_model().eval()
    ids = torch.stack([torch.as_tensor(s["input_ids"]) for s in random_samples(4, 12, ragged=False)])
    with torch.no_grad():
        expected = teacher(input_ids=ids).logits
        memo = cache_modes.MemoizedTeacher(teacher)
        with memo:
            memo.fill([{"input_ids": row.tolist()} for row in ids[:3]], batch_size=2)
            assert len(memo.memo) == 3
            got = teacher(input_ids=ids[[3, 0, 2]], attention_mask=torch.ones(3, 12, dtype=torch.long)).logits
        assert len(memo.memo) == 4
        torch.testing.assert_close(got, expected[[3, 0, 2]], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(teacher(input_ids=ids).logits, expected)  # the teacher is itself again


def test_verdicts_say_when_a_target_is_missed():
    sizes = {"sampled12": 30.0, "topk64_uint8": 204.8}
    results = {"bytes": {k: {"bytes_per_token": v, "teacher_bytes_per_token": v - 8} for k, v in sizes.items()}}
    lines = cache_modes.verdicts(results)
    assert lines[0].startswith("sampled12: 30.0") and lines[0].endswith("met")
    assert lines[1].startswith("topk64_uint8: 204.8") and lines[1].endswith("missed")


def test_the_read_verdict_is_slower_when_any_batch_reads_slower():
    def read_verdicts(compressed_ms):
        reads = {"topk64": {4: 1.0, 16: 0.5}, "topk64_uint8": dict(zip((4, 16), compressed_ms))}
        sizes = {"topk64": 393.9, "topk64_uint8": 140.2}
        results = {
            "bytes": {
                k: {"bytes_per_token": sizes[k], "teacher_bytes_per_token": sizes[k] - 6, "read_ms_per_sample": v}
                for k, v in reads.items()
            }
        }
        return [line for line in cache_modes.verdicts(results) if " read " in line]

    assert read_verdicts((0.9, 0.5)) == [
        "topk64_uint8 read / topk64 read: 0.90 at batch 4, 1.00 at batch 16 (at least as fast at every batch)"
    ]
    assert read_verdicts((0.9, 0.55)) == [
        "topk64_uint8 read / topk64 read: 0.90 at batch 4, 1.10 at batch 16 (slower at batch 16)"
    ]
