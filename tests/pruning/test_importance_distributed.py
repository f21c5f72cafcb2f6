import os
import subprocess
import sys

import pytest
import torch
from conftest import TESTS, random_samples, tiny_model

from hf_minitron import ImportanceScores, PrunedConfig, estimate_importance
from hf_minitron.evaluation import lm_loss


@pytest.mark.distributed
def test_two_processes_equal_one_process_over_all_data(tmp_path):
    script = os.path.join(str(TESTS), "scripts", "importance_distributed.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29533",
        script,
        str(tmp_path),
    ]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    distributed = ImportanceScores.load(tmp_path)

    model = tiny_model("llama")
    samples = random_samples(11)
    single = estimate_importance(model, samples, PrunedConfig(calibration_batch_size=2), show_progress=False)
    assert distributed.num_samples == 11 and distributed.num_tokens == single.num_tokens
    for agg in ("l2", "mean", "var"):
        for name in ("head_scores", "neuron_scores", "hidden_scores"):
            torch.testing.assert_close(
                getattr(distributed, name)(agg), getattr(single, name)(agg), rtol=1e-6, atol=1e-8
            )
    torch.testing.assert_close(distributed.block_influence, single.block_influence, rtol=1e-6, atol=1e-8)
    assert distributed.base_loss == pytest.approx(lm_loss(model, samples, batch_size=3), rel=1e-6)
