"""`hf-minitron <command> --help`: fast, our options first and grouped, examples, and correct flags."""

import os
import subprocess
import sys
import time

import pytest

from hf_minitron import cli
from hf_minitron.cli import main


@pytest.fixture
def help_cache(tmp_path, monkeypatch):
    """The help texts are kept under the hf-minitron cache: a fresh one per test."""
    monkeypatch.setenv("HF_MINITRON_CACHE", str(tmp_path))
    monkeypatch.setenv("COLUMNS", "100")
    return tmp_path


def _help(command, capsys) -> str:
    assert main([command, "--help"]) == 0
    return capsys.readouterr().out


def test_importing_the_cli_imports_nothing_heavy():
    code = "import sys, hf_minitron, hf_minitron.cli; print(sorted({'torch', 'transformers', 'peft', 'lm_eval'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_second_help_is_served_without_importing_the_stack(help_cache):
    env = {**os.environ, "HF_MINITRON_CACHE": str(help_cache), "COLUMNS": "100"}
    command = [sys.executable, "-X", "importtime", "-m", "hf_minitron.cli", "distill", "--help"]
    first = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
    start = time.perf_counter()
    second = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
    elapsed = time.perf_counter() - start
    assert second.stdout == first.stdout and "--kd_loss" in second.stdout
    imported = {line.split("|")[-1].strip() for line in second.stderr.splitlines() if line.startswith("import time")}
    assert not {"torch", "transformers", "peft", "lm_eval"} & imported
    assert {"torch", "transformers"} <= imported | {
        line.split("|")[-1].strip() for line in first.stderr.splitlines()
    }  # the first one built it
    assert elapsed < 10  # ~0.3 s on an idle 2-core CPU; generous for a loaded CI machine


def test_cached_help_follows_the_terminal_width(help_cache, capsys, monkeypatch):
    wide = _help("evaluate", capsys)
    assert cli.cached_help("evaluate") == wide
    monkeypatch.setenv("COLUMNS", "60")
    assert cli.cached_help("evaluate") is None  # another width, another text
    narrow = _help("evaluate", capsys)
    assert len(narrow.splitlines()) > len(wide.splitlines())  # the options' help is wrapped to the width


def test_distill_help_lists_our_options_first_in_groups(help_cache, capsys):
    text = _help("distill", capsys)
    assert text.startswith("usage: hf-minitron distill [--config FILE] [--option value ...]")
    assert "examples:\n  hf-minitron distill --student outputs/smollm2-135m-stages/pruned" in text
    ours = text.index("DistillArguments options (hf-minitron)")
    config = text.index("DistillationConfig options (hf-minitron)")
    theirs = text.index("transformers.TrainingArguments options")

    def option(name):
        return text.index(f"\n  {name} ")

    assert ours < option("--student") < config < option("--kd_loss") < theirs < option("--learning_rate")
    assert option("--router_aux_loss_coef") < theirs
    # The usage line no longer lists ~300 options: our first option is near the top.
    assert text[: option("--student")].count("\n") < 30


def test_prune_help_describes_negative_flags(help_cache, capsys):
    text = _help("prune", capsys)
    entry = text[text.index("--no_save_scores") :].split("\n  --", 1)[0]
    assert "Turn --save_scores off" in entry and "default" not in entry
    assert "Write the importance scores next to the model" in text[: text.index("--no_save_scores")]


def test_negative_flag_still_parses(tmp_path):
    from hf_minitron.commands.prune import PruneArguments
    from hf_minitron.pruning.config import PrunedConfig

    args, _ = cli.parse_dataclasses((PruneArguments, PrunedConfig), ["--no_save_scores"], "hf-minitron prune")
    assert args.save_scores is False
    args, _ = cli.parse_dataclasses((PruneArguments, PrunedConfig), [], "hf-minitron prune")
    assert args.save_scores is True
    config = tmp_path / "c.yaml"
    config.write_text("save_scores: false\n")
    args, _ = cli.parse_dataclasses((PruneArguments, PrunedConfig), ["--config", str(config)], "hf-minitron prune")
    assert args.save_scores is False


def test_run_help_has_examples_and_sections(help_cache, capsys):
    text = _help("run", capsys)
    assert text.startswith("usage: hf-minitron run RECIPE.yaml")
    assert "hf-minitron run recipes/smollm2-135m/minitron.yaml" in text and "--distillation.max_steps" in text
    for option in ("--teacher", "--output_dir", "--eval_tasks", "--pruning.KEY", "--distillation.KEY", "--sft.KEY"):
        assert option in text, option
    assert main(["run"]) == 0 and "usage: hf-minitron run" in capsys.readouterr().out


def test_every_command_help_has_an_example(help_cache, capsys):
    for command in cli.COMMANDS:
        text = _help(command, capsys)
        assert f"hf-minitron {command}" in text and "examples:" in text, command


def test_distill_needs_a_student(checkpoint, tmp_path, capsys):
    code = main(["distill", "--teacher", str(checkpoint), "--output_dir", str(tmp_path / "run")])
    assert code == 2
    assert "--student" in capsys.readouterr().err and not (tmp_path / "run").exists()


def test_alignment_help_puts_the_model_first_and_the_trainer_options_in_short(help_cache, capsys):
    text = _help("sft", capsys)
    model = text.index("\n  --model_name_or_path ")
    assert model < text.index("trl.SFTConfig options") < text.index("transformers.TrainingArguments options")
    assert text[:model].count("\n") < 40 and len(text.splitlines()) < 400  # was 713 lines, the model near the end
    assert "--learning_rate" in text and "--adam_beta2" not in text and "more: `--help-all` lists them" in text
    assert main(["sft", "--help-all"]) == 0
    full = capsys.readouterr().out
    assert "--adam_beta2" in full and len(full.splitlines()) > len(text.splitlines())
    assert main(["sft", "--help"]) == 0 and capsys.readouterr().out == text  # the short one is cached apart


def test_prepared_help_serves_a_first_help_of_every_command(help_cache, monkeypatch):
    # `make install` prepares them: the first `--help` of a command then imports nothing heavy (see the test above).
    assert all(cli.cached_help(name) is None for name in cli.COMMANDS)
    stored = cli.prepare_help(widths=(100,))
    assert stored == 2 * len(cli.COMMANDS) - 1  # --help and --help-all of each command; run has one help
    assert all(cli.cached_help(name) is not None for name in cli.COMMANDS)
    assert "--adam_beta2" in cli.cached_help("distill-all") and "--adam_beta2" not in cli.cached_help("distill")
