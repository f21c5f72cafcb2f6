"""The `hf-minitron` subcommands that wrap the recipes: distill, correct-teacher, sft, evaluate, push, --help."""

import json

import pytest
import torch
from conftest import ROOT, tiny_model
from transformers import AutoModelForCausalLM

from hf_minitron.cli import main


@pytest.fixture
def student(tmp_path, tokenizer):
    path = tmp_path / "student"
    tiny_model("llama", seed=1, num_hidden_layers=1).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


TRAIN_OPTIONS = ["--per_device_train_batch_size", "2", "--logging_steps", "1", "--report_to", "none"]


def test_distill_end_to_end(checkpoint, student, text_file, tmp_path):
    output = tmp_path / "distilled"
    config = tmp_path / "distill.yaml"
    config.write_text("seq_length: 16\nmax_train_samples: 8\nmax_steps: 2\nlearning_rate: 0.01\nsave_strategy: 'no'\n")
    code = main(
        ["distill", "--config", str(config), "--student", str(student), "--teacher", str(checkpoint)]
        + ["--dataset", str(text_file), "--text_column", "content", "--output_dir", str(tmp_path / "run")]
        + ["--final_model_dir", str(output), *TRAIN_OPTIONS]
    )
    assert code == 0
    distilled = AutoModelForCausalLM.from_pretrained(output)
    before = AutoModelForCausalLM.from_pretrained(student)
    changed = [name for name, p in distilled.state_dict().items() if not torch.equal(p, before.state_dict()[name])]
    assert changed
    assert (output / "tokenizer.json").is_file()


def test_distill_streams_a_corpus(checkpoint, student, text_file, tmp_path):
    output = tmp_path / "distilled"
    code = main(
        ["distill", "--student", str(student), "--teacher", str(checkpoint), "--dataset", str(text_file)]
        + ["--text_column", "content", "--seq_length", "16", "--streaming", "true"]
        + ["--streaming_validation_documents", "1", "--max_steps", "2", "--learning_rate", "0.01"]
        + ["--save_strategy", "no", "--output_dir", str(tmp_path / "run"), "--final_model_dir", str(output)]
        + TRAIN_OPTIONS
    )
    assert code == 0
    distilled = AutoModelForCausalLM.from_pretrained(output).state_dict()
    before = AutoModelForCausalLM.from_pretrained(student).state_dict()
    assert any(not torch.equal(p, before[name]) for name, p in distilled.items())


def test_streaming_without_max_steps_fails_before_loading(checkpoint, text_file, tmp_path, capsys):
    code = main(
        ["correct-teacher", "--teacher", str(checkpoint), "--dataset", str(text_file), "--text_column", "content"]
        + ["--streaming", "true", "--output_dir", str(tmp_path / "run"), "--report_to", "none"]
    )
    assert code == 2
    assert "streaming=true needs max_steps > 0" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_distill_bad_value_names_the_field(checkpoint, student, tmp_path, capsys):
    code = main(
        ["distill", "--student", str(student), "--teacher", str(checkpoint), "--output_dir", str(tmp_path / "run")]
        + ["--jsd_beta", "2", "--report_to", "none"]
    )
    assert code == 2
    assert "jsd_beta" in capsys.readouterr().err


ON_POLICY_OPTIONS = ["--bf16", "false", "--gradient_checkpointing", "false", "--save_strategy", "no"]


def test_on_policy_end_to_end(checkpoint, student, text_file, tmp_path):
    output = tmp_path / "on_policy"
    code = main(
        ["on-policy", "--student", str(student), "--teacher", str(checkpoint), "--dataset", str(text_file)]
        + ["--text_column", "content", "--seq_length", "16", "--max_train_samples", "4", "--prompt_length", "8"]
        + ["--max_completion_length", "8", "--max_steps", "2", "--learning_rate", "0.01", "--use_cpu", "true"]
        + ["--output_dir", str(tmp_path / "run"), "--final_model_dir", str(output), *ON_POLICY_OPTIONS, *TRAIN_OPTIONS]
    )
    assert code == 0
    trained = AutoModelForCausalLM.from_pretrained(output).state_dict()
    before = AutoModelForCausalLM.from_pretrained(student).state_dict()
    assert any(not torch.equal(p, before[name]) for name, p in trained.items())
    assert (output / "tokenizer.json").is_file() and not (output / "training_args.bin").exists()


def test_on_policy_refuses_bad_input_before_loading(checkpoint, student, tmp_path, capsys):
    common = ["--student", str(student), "--output_dir", str(tmp_path / "run"), "--report_to", "none"]
    common += ["--bf16", "false"]
    assert main(["on-policy", *common, "--teacher", str(checkpoint), "--seq_length", "8", "--prompt_length", "9"]) == 2
    assert "prompt_length=9 is longer than the packed samples" in capsys.readouterr().err
    assert main(["on-policy", *common, "--teacher", str(checkpoint), "--beta", "2"]) == 2
    assert "OnPolicyConfig.beta=2.0 is invalid" in capsys.readouterr().err
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "teacher_cache.json").write_text("{}")
    assert main(["on-policy", *common, "--teacher", str(cache)]) == 2
    assert "needs a live teacher" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("command", ["distill", "on-policy"])
def test_trainer_push_without_a_token_fails_before_loading(command, checkpoint, student, tmp_path, capsys, hub_env):
    """`push_to_hub` makes the trainer upload its checkpoints: no token is an error before any weights are loaded."""
    import transformers

    def loaded(*args, **kwargs):
        raise AssertionError("weights were loaded although the upload could not work")

    argv = [command, "--student", str(student), "--teacher", str(checkpoint), "--output_dir", str(tmp_path / "run")]
    argv += ["--report_to", "none", "--bf16", "false", "--push_to_hub", "true", "--hub_model_id", "me/tiny"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", loaded)
        assert main(argv) == 2
    assert "HF_TOKEN" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_evaluate_writes_both_models(checkpoint, student, tmp_path, capsys):
    output = tmp_path / "eval.json"
    code = main(
        ["evaluate", "--model", str(student), "--teacher", str(checkpoint), "--tasks", "pydoc_topics"]
        + ["--limit", "4", "--batch_size", "4", "--output_file", str(output)]
    )
    assert code == 0
    result = json.loads(output.read_text())
    assert set(result["models"]) == {"teacher", "student"}
    assert result["models"]["student"]["results"]["pydoc_topics"]["num_samples"] == 4
    assert "Teacher vs student" in capsys.readouterr().out


def test_evaluate_bad_dtype_exits_2(checkpoint, capsys):
    assert main(["evaluate", "--model", str(checkpoint), "--dtype", "int8"]) == 2
    assert "dtype" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("command", "fields"),
    [
        ("distill", ["--student", "--teacher", "--dataset", "--text_column", "--seq_length", "--max_train_samples"]),
        ("distill", ["--kd_loss", "--kd_temperature", "--intermediate_layer_mapping", "--output_dir"]),
        ("correct-teacher", ["--teacher", "--dataset", "--seq_length", "--use_lora", "--corrected_model_dir"]),
        ("on-policy", ["--student", "--teacher", "--final_model_dir", "--prompt_length", "--beta", "--temperature"]),
        ("sft", ["--dataset_name", "--chat_template", "--final_model_dir", "--model_name_or_path", "--use_peft"]),
        ("dpo", ["--dataset_name", "--rpo_alpha", "--beta", "--model_name_or_path"]),
        ("evaluate", ["--model", "--teacher", "--tasks", "--num_fewshot", "--limit", "--output_file"]),
        ("push", ["--folder", "--repo_id", "--private", "--endpoint", "--commit_message"]),
    ],
)
def test_help_lists_fields(command, fields, capsys):
    assert main([command, "--help"]) == 0
    printed = capsys.readouterr().out
    assert f"hf-minitron {command}" in printed
    for name in fields:
        assert name in printed, name


def test_top_level_help_lists_commands(capsys):
    assert main(["--help"]) == 0
    printed = capsys.readouterr().out
    for command in ("distill", "on-policy", "correct-teacher", "sft", "dpo", "evaluate", "push"):
        assert command in printed


def test_push_without_token_fails_clearly(checkpoint, monkeypatch, tmp_path, capsys):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-stored-tokens"))
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    code = main(["push", "--folder", str(checkpoint), "--repo_id", "me/tiny", "--endpoint", "http://127.0.0.1:9"])
    assert code == 2
    err = capsys.readouterr().err
    assert "HF_TOKEN" in err and "hf auth login" in err


def test_push_offline_fails_clearly(checkpoint, monkeypatch, capsys):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["push", "--folder", str(checkpoint), "--repo_id", "me/tiny"]) == 2
    assert "HF_HUB_OFFLINE" in capsys.readouterr().err


def test_correct_teacher_smoke(checkpoint, text_file, tmp_path):
    output = tmp_path / "corrected"
    code = main(
        ["correct-teacher", "--teacher", str(checkpoint), "--dataset", str(text_file), "--text_column", "content"]
        + ["--seq_length", "16", "--max_train_samples", "4", "--max_steps", "1", "--save_strategy", "no"]
        + ["--output_dir", str(tmp_path / "run"), "--corrected_model_dir", str(output), *TRAIN_OPTIONS]
    )
    assert code == 0
    assert AutoModelForCausalLM.from_pretrained(output).config.num_hidden_layers == 4


def test_distill_recipe_yaml_parses():

    import yaml
    from transformers import HfArgumentParser

    from hf_minitron.commands.distill import DistillArguments
    from hf_minitron.distillation.config import DistillationConfig

    path = ROOT / "recipes" / "smollm2-135m" / "distill.yaml"
    parser = HfArgumentParser((DistillArguments, DistillationConfig))
    args, config = parser.parse_dict(yaml.safe_load(path.read_text()), allow_extra_keys=False)
    assert args.teacher == "embedded" and config.kd_loss == "forward_kl" and config.report_to == []


def test_sft_smoke(checkpoint, tmp_path):
    output = tmp_path / "sft"
    code = main(
        ["sft", "--model_name_or_path", str(checkpoint), "--chat_template", "chatml", "--max_train_samples", "4"]
        + [
            "--max_steps",
            "1",
            "--max_length",
            "32",
            "--bf16",
            "false",
            "--save_strategy",
            "no",
            "--output_dir",
            str(tmp_path / "run"),
        ]
        + ["--final_model_dir", str(output), *TRAIN_OPTIONS]
    )
    assert code == 0
    assert AutoModelForCausalLM.from_pretrained(output).config.num_hidden_layers == 4
