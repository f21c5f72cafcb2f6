"""`hf-minitron search` and the SmolLM2 search recipe."""

import json

import pytest
import torch
import yaml
from conftest import ROOT
from transformers import HfArgumentParser, LlamaConfig

from hf_minitron.cli import main
from hf_minitron.commands.search import SearchArguments
from hf_minitron.distillation.config import DistillationConfig
from hf_minitron.pruning.candidates import enumerate_candidates
from hf_minitron.pruning.search_config import SearchConfig


RECIPE = ROOT / "recipes" / "smollm2-135m" / "search.yaml"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: a second thread only adds contention
    yield
    torch.set_num_threads(threads)


def _smollm2_config():
    # SmolLM2-135M's shape, without loading the embedded weights.
    return LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, head_dim=64, tie_word_embeddings=True,
    )  # fmt: skip


def test_smollm2_recipe_parses_and_has_candidates():
    parser = HfArgumentParser((SearchArguments, SearchConfig, DistillationConfig))
    args, config, retraining = parser.parse_dict(yaml.safe_load(RECIPE.read_text()), allow_extra_keys=False)
    assert args.teacher == "embedded" and args.scorer == "heldout_loss"
    assert retraining.lr_scheduler_type == "constant" and retraining.report_to == []
    assert config.pruning["depth_method"] == "block_influence"
    candidates = enumerate_candidates(_smollm2_config(), config)
    assert len(candidates) == config.max_candidates == 3
    assert len({c.shape["num_hidden_layers"] for c in candidates}) > 1  # depth and width shapes compete
    for c in candidates:
        assert abs(c.num_parameters / 134_515_008 - 0.6) <= 0.6 * 0.05


TINY = [
    "--num_hidden_layers_grid", "3", "4", "--hidden_size_grid", "24", "32", "--intermediate_size_grid", "40", "64",
    "--num_attention_heads_grid", "2", "4", "--target_ratio", "0.75", "--tolerance", "0.15", "--max_candidates", "2",
    "--pruning", '{"calibration_samples": 8, "calibration_batch_size": 4, "depth_calibration_samples": 4}',
    "--seq_length", "16", "--max_train_samples", "16", "--max_eval_samples", "4",
    "--retrain_steps", "2", "--eval_interval", "1", "--eval_batch_size", "4", "--per_device_train_batch_size", "2",
]  # fmt: skip


def test_search_command_on_a_tiny_model(checkpoint, text_file, tmp_path, capsys):
    output = tmp_path / "search"
    argv = ["search", "--config", str(RECIPE), "--teacher", str(checkpoint), "--dataset", str(text_file),
            "--text_column", "content", "--output_dir", str(output), *TINY]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    result = json.loads((output / "search_results.json").read_text())
    assert len(result["candidates"]) == 2 and result["steps"] == [0, 1, 2]
    best = min(result["candidates"], key=lambda c: c["metric"]["2"])
    assert f"Best of 2 candidates after 2 KD steps: {best['name']}" in out
    assert (output / "search_results.png").is_file() and (output / "importance" / "importance.json").is_file()
    # Rerunning the command reuses every finished candidate.
    mtimes = {p: p.stat().st_mtime_ns for p in (output / "candidates").glob("*/result.json")}
    assert main(argv) == 0
    assert {p: p.stat().st_mtime_ns for p in (output / "candidates").glob("*/result.json")} == mtimes


def test_search_command_bad_budget_fails_before_loading(checkpoint, tmp_path, capsys, monkeypatch):
    import transformers

    def forbidden(*args, **kwargs):
        raise AssertionError("weights were loaded before the budget was checked")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", forbidden)
    argv = ["search", "--teacher", str(checkpoint), "--output_dir", str(tmp_path / "s"), "--report_to",
            "none"]  # fmt: skip
    assert main([*argv, "--target_ratio", "0.05"]) == 2
    assert "No candidate architecture within ±5%" in capsys.readouterr().err
    assert main([*argv, "--target_params", "10000000"]) == 2
    assert "more than the teacher" in capsys.readouterr().err
    assert main([*argv, "--target_ratio", "0.7", "--tolerance", "0"]) == 2
    assert "SearchConfig.tolerance=0.0 is invalid" in capsys.readouterr().err
