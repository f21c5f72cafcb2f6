import json

import pytest
from transformers import AutoModelForCausalLM

from hf_minitron.cli import main


def test_prune_command_end_to_end(checkpoint, text_file, tmp_path, capsys):
    config = tmp_path / "pruned.yaml"
    config.write_text(
        "hidden_size: 24\nintermediate_size: 48\nnum_hidden_layers: 3\ncalibration_samples: 8\ncalibration_seq_length: 32\n"
    )
    output = tmp_path / "out"
    code = main(
        [
            "prune",
            "--teacher",
            str(checkpoint),
            "--config",
            str(config),
            "--calibration_data",
            str(text_file),
            "--text_column",
            "content",
            "--output_dir",
            str(output),
            "--intermediate_size",
            "40",
        ]  # CLI overrides the file
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "hidden_size" in printed and "params: total" in printed and "24" in printed
    model = AutoModelForCausalLM.from_pretrained(output)
    assert (model.config.hidden_size, model.config.intermediate_size, model.config.num_hidden_layers) == (24, 40, 3)
    assert (output / "pruned_config.json").is_file() and (output / "importance" / "importance.json").is_file()
    assert (output / "tokenizer.json").is_file()
    summary = json.loads((output / "pruning_summary.json").read_text())
    assert summary["after"]["parameters"]["total"] == sum(p.numel() for p in model.parameters())
    assert not list(tmp_path.glob(".out.tmp-*"))


def test_bad_values_fail_before_loading_weights(checkpoint, tmp_path, capsys):
    assert (
        main(["prune", "--teacher", str(checkpoint), "--hidden_size", "64", "--output_dir", str(tmp_path / "o")]) == 2
    )
    assert "hidden_size=64 is larger than the source model's hidden_size=32" in capsys.readouterr().err
    config = tmp_path / "typo.yaml"
    config.write_text("hiden_size: 24\n")
    assert main(["prune", "--teacher", str(checkpoint), "--config", str(config)]) == 2
    assert "Unknown option(s) ['hiden_size']" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_existing_output_is_not_overwritten_without_flag(checkpoint, tmp_path, capsys):
    output = tmp_path / "out"
    output.mkdir()
    (output / "precious.txt").write_text("keep me")
    code = main(
        [
            "prune",
            "--teacher",
            str(checkpoint),
            "--hidden_size",
            "16",
            "--importance",
            "magnitude",
            "--output_dir",
            str(output),
        ]
    )
    # Not a model output: --overwrite would refuse it too, so the error says so instead of suggesting it.
    err = capsys.readouterr().err
    assert code == 2 and "refusing to replace it even with --overwrite" in err and "choose another directory" in err
    assert (output / "precious.txt").read_text() == "keep me"


def test_help_lists_every_field(capsys):
    assert main(["prune", "--help"]) == 0
    out = capsys.readouterr().out
    for name in ("--hidden_size", "--sequence_aggregation", "--calibration_data", "--head_merge", "--depth_method"):
        assert name in out
    assert main([]) == 0 and "prune" in capsys.readouterr().out
    assert main(["nope"]) == 2


@pytest.mark.parametrize(
    "argv, old, new",
    [
        (["prune", "--model", "embedded"], "--model", "--teacher"),
        (["prune", "--output", "out"], "--output", "--output_dir"),
        (["correct-teacher", "--model=embedded"], "--model", "--teacher"),
        (["search", "--model_name_or_path", "embedded"], "--model_name_or_path", "--teacher"),
    ],
)
def test_renamed_options_are_refused_with_their_new_name(argv, old, new, tmp_path, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"{old} (on the command line) is now {new}" in err
    assert "Traceback" not in err


def test_renamed_keys_in_a_config_file_are_refused_with_their_new_name(tmp_path, capsys):
    config = tmp_path / "old.yaml"
    config.write_text("output: outputs/x\nhidden_size: 24\n")
    assert main(["prune", "--config", str(config)]) == 2
    assert f"output: (in {config}) is now output_dir:" in capsys.readouterr().err
    assert not (tmp_path / "outputs").exists()


def test_evaluate_keeps_its_model_option(tmp_path, capsys):
    # `evaluate --model` is the model evaluated (the teacher is the comparison): not a renamed option.
    assert main(["evaluate", "--model", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert "is now" not in err and "missing" in err


def test_version_and_typos_get_an_answer(capsys):
    from hf_minitron import __version__

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"hf-minitron {__version__}"
    assert main(["prun"]) == 2
    assert "unknown command 'prun': did you mean 'prune'?" in capsys.readouterr().err
    assert main(["prune", "--hiden_size", "24"]) == 2
    assert "Unknown option --hiden_size. Did you mean --hidden_size?" in capsys.readouterr().err


def test_run_help_gives_each_default_once(capsys):
    assert main(["run", "--help"]) == 0
    import dataclasses

    from hf_minitron.commands.run_config import MinitronArguments

    text = " ".join(capsys.readouterr().out.split())
    assert text.count("(default: ") == len(dataclasses.fields(MinitronArguments))  # one per top-level option
    assert "(default: embedded) (default" not in text


def test_a_misspelt_run_section_names_the_section(tmp_path):
    from hf_minitron.commands.run_config import load_pipeline_config

    recipe = tmp_path / "r.yaml"
    recipe.write_text("teacher: embedded\n")
    with pytest.raises(ValueError, match="Unknown section 'distilation' in the recipe: did you mean 'distillation'"):
        load_pipeline_config(recipe, {"distilation.max_steps": 5})
