"""The bad-input catalog: every case fails with an error naming the cause and the fix, before
expensive work (weights loaded, importance estimated, training started) where it can, and leaves what was already
written byte-identical. Tiny random models, loopback only."""

import errno
import json
import shutil
import socket
from pathlib import Path

import pytest
import torch
from conftest import _tiny_recipe, random_samples, tiny_config, tiny_model, tiny_tokenizer
from hub_server import FakeHub
from transformers import AutoModelForCausalLM, Trainer

from hf_minitron import PrunedConfig, estimate_importance, prune_model
from hf_minitron.cli import main
from hf_minitron.commands.distill import DistillArguments, distill_checkpoint
from hf_minitron.commands.prune import PruneArguments, prune_checkpoint
from hf_minitron.commands.run import run_pipeline
from hf_minitron.commands.run_config import build_pipeline_config
from hf_minitron.distillation.config import DistillationConfig
from hf_minitron.hub import HubUploadError, push_to_hub
from hf_minitron.pruning.importance import ImportanceScores


TOKEN = "hf_bad_input_test_token"


# ---------------------------------------------------------------------------------------------- helpers
def snapshot(directory: Path) -> dict:
    """Every file under `directory` (relative path -> bytes), to show that nothing written before was touched."""
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def leftovers(parent: Path) -> list[str]:
    """Hidden temporary siblings (`.name.tmp-*` / `.name.old-*`) that an atomic write left behind."""
    return sorted(
        p.name for p in parent.iterdir() if p.name.startswith(".") and (".tmp-" in p.name or ".old-" in p.name)
    )


@pytest.fixture
def no_expensive_work(monkeypatch):
    """Fails the test if weights are loaded, importance is estimated or training starts."""

    def forbidden(what):
        def fail(*args, **kwargs):
            raise AssertionError(f"{what} ran although the input was already known to be bad")

        return fail

    import hf_minitron.pruning.prune

    monkeypatch.setattr(hf_minitron.pruning.prune, "estimate_importance", forbidden("estimate_importance"))
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", forbidden("from_pretrained (weights)"))
    monkeypatch.setattr(Trainer, "train", forbidden("Trainer.train"))


def prune_args(model, output, **kwargs) -> PruneArguments:
    return PruneArguments(teacher=str(model), output_dir=str(output), **kwargs)


SMALL = dict(
    hidden_size=16,
    num_attention_heads=2,
    intermediate_size=32,
    calibration_samples=4,
    calibration_batch_size=2,
    calibration_seq_length=16,
)


@pytest.fixture
def texts(text_file):
    return str(text_file)


# ---------------------------------------------------------------------------------------------- checkpoints on disk
def test_missing_checkpoint_directory(tmp_path, no_expensive_work):
    with pytest.raises(
        FileNotFoundError, match=r"does not exist: pass an existing directory written by save_pretrained"
    ):
        prune_checkpoint(prune_args(tmp_path / "no-such-model", tmp_path / "out"), PrunedConfig(**SMALL))
    assert not (tmp_path / "out").exists()


def test_checkpoint_without_config(checkpoint, tmp_path, no_expensive_work):
    (checkpoint / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"holds no config\.json.*save_pretrained"):
        prune_checkpoint(prune_args(checkpoint, tmp_path / "out"), PrunedConfig(**SMALL))


def test_checkpoint_without_weights(checkpoint, tmp_path, no_expensive_work):
    (checkpoint / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"holds no weights.*copy the weights next to config\.json"):
        prune_checkpoint(prune_args(checkpoint, tmp_path / "out"), PrunedConfig(**SMALL))


def test_truncated_weights(checkpoint, tmp_path, no_expensive_work):
    weights = checkpoint / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])  # an interrupted download
    with pytest.raises(ValueError, match=r"model\.safetensors is truncated: .* re-download the checkpoint"):
        prune_checkpoint(prune_args(checkpoint, tmp_path / "out"), PrunedConfig(**SMALL))


def test_corrupt_weights_header(checkpoint, tmp_path, no_expensive_work):
    (checkpoint / "model.safetensors").write_bytes(b"this is not a safetensors file at all, just text")
    with pytest.raises(ValueError, match=r"(truncated|corrupt).*re-download the checkpoint"):
        prune_checkpoint(prune_args(checkpoint, tmp_path / "out"), PrunedConfig(**SMALL))


def test_missing_shard(tmp_path, tokenizer, no_expensive_work):
    path = tmp_path / "sharded"
    tiny_model("llama").save_pretrained(path, max_shard_size="20KB")
    tokenizer.save_pretrained(path)
    shards = sorted(path.glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[-1].unlink()
    with pytest.raises(FileNotFoundError, match=r"incomplete: 1 of the \d+ shards .* download or copy the whole"):
        prune_checkpoint(prune_args(path, tmp_path / "out"), PrunedConfig(**SMALL))


def test_pickle_only_checkpoint_is_refused(checkpoint, tmp_path, no_expensive_work):
    (checkpoint / "model.safetensors").rename(checkpoint / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"pickle weights .* safetensors only .*save_pretrained\(path\)"):
        prune_checkpoint(prune_args(checkpoint, tmp_path / "out"), PrunedConfig(**SMALL))


def test_unsupported_architecture(tmp_path, tokenizer, no_expensive_work):
    from transformers import GPT2Config

    path = tmp_path / "gpt2"
    path.mkdir()
    config = GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4)
    config.save_pretrained(path)
    torch.manual_seed(0)
    from transformers import GPT2LMHeadModel

    GPT2LMHeadModel(config).save_pretrained(path)
    with pytest.raises(
        ValueError, match=r"Unsupported architecture: model_type='gpt2'.*supports .*llama.*ArchitectureSpec"
    ):
        prune_checkpoint(prune_args(path, tmp_path / "out"), PrunedConfig(**SMALL))
    # The same check guards the in-memory API, before any forward pass.
    with pytest.raises(ValueError, match="Unsupported architecture"):
        estimate_importance(GPT2LMHeadModel(config), random_samples(2), PrunedConfig(calibration_samples=2))


# ---------------------------------------------------------------------------------------------- teacher vs student
def test_teacher_student_vocab_mismatch(tmp_path):
    student, teacher = tiny_model("llama"), tiny_model("llama", vocab_size=128)
    args = DistillationConfig(output_dir=str(tmp_path / "run"), report_to="none", use_cpu=True)
    with pytest.raises(
        ValueError,
        match=r"teacher's vocabulary \(128 rows\) differs from the student's \(96\).*shared "
        r"tokenizer",
    ):
        from hf_minitron import DistillationTrainer

        DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=random_samples(4))
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_teacher_student_tokenizer_mismatch(checkpoint, tmp_path, text_file, no_expensive_work):
    """Same vocabulary size, different tokens: the sizes agree, so only comparing the vocabularies catches it."""
    other = tmp_path / "other-teacher"
    shutil.copytree(checkpoint, other)
    vocab = dict(tiny_tokenizer().get_vocab())
    # A tokenizer trained on other text maps ids to other tokens.
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=len(vocab), special_tokens=["<pad>", "<s>", "</s>"], show_progress=False)
    tok.train_from_iterator(["zzzz yyyy xxxx " * 50, "qqqq wwww " * 40], trainer=trainer)
    PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    ).save_pretrained(other)
    args = DistillArguments(
        student=str(checkpoint), teacher=str(other), dataset=str(text_file), text_column="content", seq_length=16
    )
    config = DistillationConfig(output_dir=str(tmp_path / "run"), report_to="none", use_cpu=True, max_steps=1)
    with pytest.raises(
        ValueError,
        match=r"tokenizer .* differ .* share one tokenizer: distil from the teacher the "
        r"student was pruned from",
    ):
        distill_checkpoint(args, config)
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------- calibration data
def test_empty_calibration_data(llama):
    with pytest.raises(ValueError, match=r"calibration data is empty.*pass at least one tokenized sample"):
        estimate_importance(llama, [], PrunedConfig(calibration_samples=4))


def test_fully_masked_calibration_data(llama):
    samples = [{"input_ids": torch.arange(3, 11), "attention_mask": torch.zeros(8, dtype=torch.long)}]
    with pytest.raises(ValueError, match=r"every sample is fully masked"):
        estimate_importance(llama, samples, PrunedConfig(calibration_samples=4))


def test_too_short_calibration_text(checkpoint, tmp_path, no_expensive_work):
    data = tmp_path / "short.jsonl"
    data.write_text(json.dumps({"text": "Too short."}) + "\n")
    config = PrunedConfig(**{**SMALL, "calibration_seq_length": 64})
    with pytest.raises(ValueError, match=r"fewer than seq_length=64 tokens.*pass more text or a smaller seq_length"):
        prune_checkpoint(prune_args(checkpoint, tmp_path / "out", calibration_data=str(data)), config)


def test_dataset_text_column_missing(checkpoint, tmp_path, texts, no_expensive_work):
    # text_file holds its text in "content", not the default "text".
    with pytest.raises(ValueError, match=r"Column 'text' not found .*columns: \['content'\].*--text-column"):
        prune_checkpoint(prune_args(checkpoint, tmp_path / "out", calibration_data=texts), PrunedConfig(**SMALL))


def test_sequence_longer_than_model_positions(checkpoint, tmp_path, texts, no_expensive_work):
    config = PrunedConfig(**{**SMALL, "calibration_seq_length": 256})  # tiny_config has max_position_embeddings=128
    with pytest.raises(
        ValueError,
        match=r"calibration_seq_length=256 is longer than the model's "
        r"max_position_embeddings=128.*Use PrunedConfig.calibration_seq_length <= 128",
    ):
        prune_checkpoint(
            prune_args(checkpoint, tmp_path / "out", calibration_data=texts, text_column="content"), config
        )


def test_sequence_longer_than_model_positions_in_memory(llama):
    samples = random_samples(2, seq_length=200, ragged=False)
    with pytest.raises(
        ValueError, match=r"calibration sample length=200 is longer than .*max_position_embeddings=128"
    ):
        estimate_importance(llama, samples, PrunedConfig(calibration_samples=2))


def test_sequence_longer_than_positions_in_distillation(checkpoint, tmp_path, texts, no_expensive_work):
    args = DistillArguments(
        student=str(checkpoint), teacher=str(checkpoint), dataset=texts, text_column="content", seq_length=512
    )
    config = DistillationConfig(output_dir=str(tmp_path / "run"), report_to="none", use_cpu=True, max_steps=1)
    with pytest.raises(ValueError, match=r"DistillArguments.seq_length=512 .* max_position_embeddings=128"):
        distill_checkpoint(args, config)


# ---------------------------------------------------------------------------------------------- overflow
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_overflowing_activations_during_importance(dtype):
    """A real overflow: layer 1's MLP gate and up projections are scaled until their product exceeds the range."""
    model = tiny_model("llama")
    scale = 1e3 if dtype == torch.float16 else 1e25
    with torch.no_grad():
        for proj in (model.model.layers[1].mlp.gate_proj, model.model.layers[1].mlp.up_proj):
            proj.weight.mul_(scale)
    model.to(dtype)
    with pytest.raises(ValueError) as info:
        estimate_importance(model, random_samples(4), PrunedConfig(calibration_samples=4), show_progress=False)
    message = str(info.value)
    assert "Non-finite activations (inf/NaN) in decoder layer 1, input of mlp.down_proj" in message
    assert f"overflows in {str(dtype).replace('torch.', '')}" in message
    if dtype == torch.float16:
        assert "Load the model in bfloat16 or float32" in message and "--dtype bfloat16" in message
    else:  # float32 has no wider dtype to go to: the weights are the problem
        assert "the weights themselves are broken" in message and "torch.isfinite" in message


def test_scores_with_nan_are_refused(llama, tmp_path):
    scores = estimate_importance(llama, random_samples(4), PrunedConfig(calibration_samples=4), show_progress=False)
    next(iter(scores.neurons.values()))[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"hold inf/NaN.*bfloat16 or float32"):
        prune_model(llama, PrunedConfig(intermediate_size=32), scores=scores)


# ---------------------------------------------------------------------------------------------- configs
def test_pruned_config_out_of_range():
    with pytest.raises(ValueError, match=r"PrunedConfig.hidden_size=0 is invalid: expected a positive integer"):
        PrunedConfig(hidden_size=0)
    with pytest.raises(ValueError, match=r"PrunedConfig.calibration_samples=-1"):
        PrunedConfig(calibration_samples=-1)


def test_pruned_config_bad_choice():
    with pytest.raises(ValueError, match=r"PrunedConfig.importance='activations' is not supported: choose one of"):
        PrunedConfig(importance="activations")


def test_distillation_config_out_of_range(tmp_path):
    with pytest.raises(ValueError, match=r"DistillationConfig.kd_temperature=0.0 is invalid: use a positive number"):
        DistillationConfig(output_dir=str(tmp_path), kd_temperature=0.0, report_to="none")
    with pytest.raises(ValueError, match=r"DistillationConfig.kd_loss='kl' is not supported: choose one of"):
        DistillationConfig(output_dir=str(tmp_path), kd_loss="kl", report_to="none")


def test_recipe_unknown_key():
    with pytest.raises(
        ValueError,
        match=r"Unknown key\(s\) \['hiden_size'\] in the 'pruning' section.*did you mean "
        r"'hidden_size'\?",
    ):
        build_pipeline_config({"output_dir": "x", "pruning": {"hiden_size": 16}})


def test_recipe_wrong_types():
    with pytest.raises(
        ValueError,
        match=r"PrunedConfig.hidden_size='wide' \(in the 'pruning' section of the recipe\) "
        r"has the wrong type: expected int",
    ):
        build_pipeline_config({"pruning": {"hidden_size": "wide"}})
    with pytest.raises(ValueError, match=r"DistillationConfig.learning_rate=\[0.1\] .* wrong type: expected float"):
        build_pipeline_config({"distillation": {"learning_rate": [0.1]}})
    with pytest.raises(
        ValueError,
        match=r"MinitronArguments.correct_teacher='yes' \(in the top level of the recipe\).*true/false for booleans",
    ):
        build_pipeline_config({"correct_teacher": "yes"})
    # YAML 1.1 reads 1e-4 as a string: a numeric string is a number, not an error.
    distillation = build_pipeline_config({"distillation": {"learning_rate": "1e-4", "report_to": "none"}})[2]
    assert distillation.learning_rate == 1e-4


@pytest.mark.parametrize("section", [None, {}, {"calibration_samples": 8}])
def test_a_run_whose_pruning_sets_no_target_is_refused_before_any_work(
    checkpoint, tmp_path, section, no_expensive_work
):
    """Without a target the importance pass would run for minutes and the "student" be the teacher itself."""
    recipe = _tiny_recipe(checkpoint, tmp_path / "out")
    recipe["pruning"] = section
    with pytest.raises(ValueError, match=r"'pruning' section sets no target, so the student would be the teacher"):
        run_pipeline(*build_pipeline_config(recipe), show_progress=False)
    assert not (tmp_path / "out").exists()


def test_an_empty_output_folder_is_refused(checkpoint, tmp_path, monkeypatch, capsys, no_expensive_work):
    """`Path("")` is the current directory: an empty output setting would write (or replace) there."""
    monkeypatch.chdir(tmp_path)
    before = set(tmp_path.iterdir())
    with pytest.raises(ValueError, match=r"MinitronArguments.output_dir is empty"):
        build_pipeline_config({**_tiny_recipe(checkpoint, "x"), "output_dir": " "})
    assert main(["prune", "--teacher", str(checkpoint), "--output_dir", "", "--hidden_size", "24"]) == 2
    assert "The output folder is empty" in capsys.readouterr().err
    assert set(tmp_path.iterdir()) == before


def test_a_required_section_that_is_not_a_mapping_does_not_offer_skipping_it():
    with pytest.raises(ValueError, match=r"'pruning' section of the recipe is a list .*lines\)\.$"):
        build_pipeline_config({"pruning": [1, 2]})
    with pytest.raises(ValueError, match=r"'sft' section .* or null to skip the stage\.$"):
        build_pipeline_config({"sft": [1, 2]})


def test_cli_config_file_wrong_type_and_unknown_key(checkpoint, tmp_path, capsys, no_expensive_work):
    recipe = tmp_path / "prune.yaml"
    recipe.write_text(f"teacher: {checkpoint}\noutput_dir: {tmp_path / 'out'}\nhidden_size: [16, 32]\n")
    assert main(["prune", "--config", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "PrunedConfig.hidden_size=[16, 32]" in err and "expected int" in err and "Fix the value" in err
    recipe.write_text(f"teacher: {checkpoint}\nhiddn_size: 16\n")
    assert main(["prune", "--config", str(recipe)]) == 2
    assert "Unknown option(s) ['hiddn_size']" in capsys.readouterr().err


def test_layers_to_drop_out_of_range(llama):
    with pytest.raises(ValueError, match=r"layers_to_drop"):
        prune_model(llama, PrunedConfig(layers_to_drop=[1, 7]), random_samples(2))
    assert llama.config.num_hidden_layers == 4  # nothing was removed


def test_layers_to_drop_not_a_list():
    with pytest.raises(ValueError, match=r"layers_to_drop='12' is invalid: expected a list of 0-based layer indices"):
        PrunedConfig(layers_to_drop="12")


def test_target_larger_than_model(checkpoint, tmp_path, texts, no_expensive_work):
    config = PrunedConfig(**{**SMALL, "hidden_size": 64})  # the model has 32
    with pytest.raises(ValueError, match=r"hidden_size=64 .*32"):
        prune_checkpoint(
            prune_args(checkpoint, tmp_path / "out", calibration_data=texts, text_column="content"), config
        )


def test_scores_from_another_model(llama, tmp_path):
    other = tiny_model("llama", intermediate_size=48)
    scores = estimate_importance(other, random_samples(4), PrunedConfig(calibration_samples=4), show_progress=False)
    scores.save(tmp_path / "scores")
    loaded = ImportanceScores.load(tmp_path / "scores")
    before = {k: v.clone() for k, v in llama.state_dict().items()}
    with pytest.raises(
        ValueError,
        match=r"different model: intermediate_size=48 in the scores vs 64 in this model.*"
        r"Estimate them again on this model",
    ):
        prune_model(llama, PrunedConfig(intermediate_size=32), scores=loaded)
    assert all(torch.equal(before[k], v) for k, v in llama.state_dict().items())  # not half-pruned


# ---------------------------------------------------------------------------------------------- output directory
def test_output_dir_that_is_not_ours(checkpoint, tmp_path, texts, no_expensive_work):
    output = tmp_path / "home"
    output.mkdir()
    (output / "thesis.tex").write_text("irreplaceable")
    before = snapshot(output)
    for overwrite in (False, True):
        with pytest.raises(FileExistsError, match=r"does not look like a model output .*refusing to replace it"):
            prune_checkpoint(
                prune_args(checkpoint, output, calibration_data=texts, text_column="content", overwrite=overwrite),
                PrunedConfig(**SMALL),
            )
    with pytest.raises(FileExistsError, match=r"does not look like a model output .* Remove it yourself"):
        prune_checkpoint(prune_args(checkpoint, output, overwrite=True), PrunedConfig(**SMALL))
    assert snapshot(output) == before


def test_output_dir_that_is_ours(checkpoint, tmp_path, texts):
    output = tmp_path / "pruned"
    args = dict(calibration_data=texts, text_column="content", save_scores=False)
    prune_checkpoint(prune_args(checkpoint, output, **args), PrunedConfig(**SMALL), show_progress=False)
    first = snapshot(output)
    with pytest.raises(FileExistsError, match=r"exists and is not empty: pass --overwrite \(overwrite=True\)"):
        prune_checkpoint(prune_args(checkpoint, output, **args), PrunedConfig(**SMALL), show_progress=False)
    assert snapshot(output) == first
    # With overwrite, a model output is replaced as a whole (not merged): another target, other weights.
    prune_checkpoint(
        prune_args(checkpoint, output, overwrite=True, **args),
        PrunedConfig(**{**SMALL, "intermediate_size": 48}),
        show_progress=False,
    )
    assert AutoModelForCausalLM.from_pretrained(output).config.intermediate_size == 48
    assert leftovers(tmp_path) == []


# ---------------------------------------------------------------------------------------------- disk space
def test_disk_full_during_save(checkpoint, tmp_path, texts, monkeypatch):
    output = tmp_path / "pruned"
    args = dict(calibration_data=texts, text_column="content")
    prune_checkpoint(prune_args(checkpoint, output, **args), PrunedConfig(**SMALL), show_progress=False)
    before = snapshot(output)

    import safetensors.torch

    def disk_full(tensors, filename, *a, **k):
        Path(filename).write_bytes(b"\0" * 100)  # a partial write, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device", filename)

    import transformers.modeling_utils

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)  # the scores
    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", disk_full)  # the model's weights
    with pytest.raises(OSError) as info:
        prune_checkpoint(
            prune_args(checkpoint, output, overwrite=True, **args),
            PrunedConfig(**{**SMALL, "intermediate_size": 48}),
            show_progress=False,
        )
    error = info.value
    assert error.errno == errno.ENOSPC
    assert f"Disk full while writing '{output}'" in str(error)
    assert "needed" in str(error) and "previous output there is unchanged" in str(error)
    assert str(error).count("Disk full") == 1 and "No space left on device" in str(error)
    assert "Free some space, or choose an output directory on another disk" in str(error)
    assert snapshot(output) == before
    assert leftovers(tmp_path) == []


def test_not_enough_free_space_before_work(checkpoint, tmp_path, texts, monkeypatch, no_expensive_work):
    import hf_minitron.io

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(hf_minitron.io.shutil, "disk_usage", lambda path: usage._replace(free=1024))
    with pytest.raises(OSError, match=r"Not enough disk space for .*out.* needed, 1.0 KiB free .* Free some space"):
        prune_checkpoint(
            prune_args(checkpoint, tmp_path / "out", calibration_data=texts, text_column="content"),
            PrunedConfig(**SMALL),
        )
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------- Hub
@pytest.fixture
def final(checkpoint):
    (checkpoint / "README.md").write_text("---\nlibrary_name: transformers\n---\n\n# Tiny\n")
    return checkpoint


def test_hub_token_missing(hub_env, final, capsys):
    with FakeHub(tokens=[TOKEN]) as hub:
        code = main(["push", "--folder", str(final), "--repo_id", "tester/tiny", "--endpoint", hub.url])
        assert hub.requests == []  # refused before any request
    assert code == 2
    assert "found none: pass token=..., set the HF_TOKEN environment variable, or run `hf auth login`" in (
        capsys.readouterr().err
    )


def test_hub_token_invalid(hub_env, final):
    bad = "hf_revoked_token"
    with FakeHub(tokens=[TOKEN]) as hub:
        with pytest.raises(HubUploadError, match=r"rejected the token .*HTTP 401.*hf auth login --force") as info:
            push_to_hub(final, "tester/tiny", token=bad, endpoint=hub.url)
        assert hub.repos == {}  # nothing created before the token was checked
    assert bad not in str(info.value)


def test_hub_unreachable(hub_env, final):
    with socket.socket() as sock:  # a port nothing listens on once the socket is closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(HubUploadError, match=rf"Could not reach the Hub at http://127.0.0.1:{port} .*HF_ENDPOINT"):
        push_to_hub(final, "tester/tiny", token=TOKEN, endpoint=f"http://127.0.0.1:{port}")


# ---------------------------------------------------------------------------------------------- offload
def test_pruning_an_offloaded_model_is_refused():
    from accelerate import cpu_offload

    model = tiny_model("llama")
    cpu_offload(model, execution_device=torch.device("cpu"))
    with pytest.raises(ValueError, match=r"cannot slice offloaded weights.*load the model without offload"):
        prune_model(model, PrunedConfig(intermediate_size=32), random_samples(2))


def test_tiny_config_fixture_is_what_the_catalog_assumes():
    config = tiny_config()
    assert (config.hidden_size, config.intermediate_size, config.max_position_embeddings) == (32, 64, 128)


# ---------------------------------------------------------------------------------------------- more entry points
def test_calibration_file_missing(checkpoint, tmp_path, no_expensive_work):
    # Without the check, a missing file name was looked up as a Hub dataset and failed as "unreachable".
    args = prune_args(checkpoint, tmp_path / "out", calibration_data="calibraton.jsonl")
    with pytest.raises(FileNotFoundError, match=r"\['calibraton.jsonl'\] .* do not exist: pass existing local files"):
        prune_checkpoint(args, PrunedConfig(**SMALL))


def test_calibration_file_empty(checkpoint, tmp_path, no_expensive_work):
    data = tmp_path / "empty.jsonl"
    data.write_text("")  # datasets raised a bare StopIteration here
    with pytest.raises(ValueError, match=r"empty.jsonl'\] are empty: pass files that hold text"):
        prune_checkpoint(prune_args(checkpoint, tmp_path / "out", calibration_data=str(data)), PrunedConfig(**SMALL))


def test_calibration_column_without_text(checkpoint, tmp_path, no_expensive_work):
    data = tmp_path / "blank.jsonl"
    data.write_text(json.dumps({"text": "   "}) + "\n" + json.dumps({"text": None}) + "\n")
    with pytest.raises(ValueError, match=r"Column 'text' of .* holds no non-empty text \(2 rows\).*--text-column"):
        prune_checkpoint(prune_args(checkpoint, tmp_path / "out", calibration_data=str(data)), PrunedConfig(**SMALL))


def test_hub_dataset_unreachable(checkpoint, tmp_path, no_expensive_work):
    # conftest sets HF_DATASETS_OFFLINE=1: the Hub cannot be reached, as on an air-gapped machine.
    args = prune_args(checkpoint, tmp_path / "out", calibration_data="someone/some-corpus")
    with pytest.raises(
        FileNotFoundError, match=r"Could not load the dataset 'someone/some-corpus'.*HF_DATASETS_OFFLINE"
    ):
        prune_checkpoint(args, PrunedConfig(**SMALL))


def test_recipe_file_with_a_syntax_error(tmp_path, capsys, no_expensive_work):
    recipe = tmp_path / "minitron.yaml"
    recipe.write_text("teacher: embedded\npruning:\n  hidden_size: [16\n")
    assert main(["run", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "is not valid YAML" in err and "line 3" in err and "Fix the syntax at that line" in err
    assert main(["prune", "--config", str(recipe)]) == 2
    assert "--config file" in capsys.readouterr().err


def test_recipe_file_missing(tmp_path, capsys):
    assert main(["run", str(tmp_path / "minitron.yml")]) == 2
    err = capsys.readouterr().err
    assert "The recipe file" in err and "minitron.yml' does not exist: check the path" in err


def test_cli_reports_a_full_disk_without_traceback(checkpoint, tmp_path, texts, monkeypatch, capsys):
    import safetensors.torch

    def disk_full(tensors, filename, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", filename)

    import transformers.modeling_utils

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", disk_full)
    output = tmp_path / "out"
    argv = ["prune", "--teacher", str(checkpoint), "--output_dir", str(output), "--calibration_data", texts]
    argv += ["--text_column", "content", "--hidden_size", "16", "--num_attention_heads", "2"]
    argv += ["--calibration_samples", "4", "--calibration_seq_length", "16"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"error: [Errno 28] Disk full while writing '{output}'" in err and "Traceback" not in err
    assert err.count("Disk full") == 1  # explained once, not once per nested atomic write
    assert not output.exists() and leftovers(tmp_path) == []


def test_evaluate_checks_both_checkpoints_before_loading(checkpoint, tmp_path, no_expensive_work):
    from hf_minitron.commands.evaluate import EvaluateArguments, evaluate_checkpoints

    args = EvaluateArguments(model=str(checkpoint), teacher=str(tmp_path / "no-teacher"), tasks="pydoc_topics")
    with pytest.raises(FileNotFoundError, match=r"no-teacher' does not exist"):
        evaluate_checkpoints(args, show_progress=False)


def test_pipeline_checks_the_teacher_before_any_stage(checkpoint, tmp_path, no_expensive_work):
    from hf_minitron.commands.run import run_pipeline

    weights = checkpoint / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    recipe = {"teacher": str(checkpoint), "output_dir": str(tmp_path / "run"), "seq_length": 32}
    recipe["pruning"] = {"hidden_size": 24}
    with pytest.raises(ValueError, match=r"model\.safetensors is truncated"):
        run_pipeline(*build_pipeline_config(recipe), show_progress=False)
    assert not (tmp_path / "run" / "pruned").exists()


def test_pipeline_sequence_longer_than_teacher_positions(checkpoint, tmp_path, no_expensive_work):
    from hf_minitron.commands.run import run_pipeline

    recipe = {"teacher": str(checkpoint), "output_dir": str(tmp_path / "run"), "seq_length": 1024}
    recipe["pruning"] = {"hidden_size": 24}
    with pytest.raises(
        ValueError, match=r"MinitronArguments.seq_length=1024 .* Use MinitronArguments.seq_length <= 128"
    ):
        run_pipeline(*build_pipeline_config(recipe), show_progress=False)


def test_distill_student_checkpoint_missing(tmp_path, checkpoint, no_expensive_work):
    args = DistillArguments(student=str(tmp_path / "pruned"), teacher=str(checkpoint))
    config = DistillationConfig(output_dir=str(tmp_path / "run"), report_to="none", use_cpu=True, max_steps=1)
    with pytest.raises(FileNotFoundError, match=r"pruned' does not exist: pass an existing directory"):
        distill_checkpoint(args, config)


def test_correct_teacher_sequence_too_long(checkpoint, tmp_path, capsys, no_expensive_work):
    # The output is a sibling of the teacher: a folder holding the teacher is refused by its own (earlier) check.
    output = str(tmp_path / "corrected")
    argv = ["correct-teacher", "--teacher", str(checkpoint), "--seq_length", "4096", "--output_dir", output]
    assert main(argv) == 2
    assert "CorrectTeacherArguments.seq_length=4096 is longer than the model's max_position_embeddings=128" in (
        capsys.readouterr().err
    )


def test_trainer_checks_teacher_path_before_loading_the_student(checkpoint, tmp_path, no_expensive_work):
    from hf_minitron import DistillationTrainer

    args = DistillationConfig(output_dir=str(tmp_path / "run"), report_to="none", use_cpu=True)
    with pytest.raises(FileNotFoundError, match=r"teachr' does not exist: pass an existing directory"):
        DistillationTrainer(model=str(checkpoint), teacher_model=str(tmp_path / "teachr"), args=args)


# ---------------------------------------------------------------------------------------------- launched processes
@pytest.mark.parametrize("trainer", ["distillation", "teacher_correction"])
def test_launched_processes_without_a_process_group(checkpoint, tmp_path, monkeypatch, trainer, no_expensive_work):
    """Two launched processes without GPUs and without `use_cpu`: each would train (and write) the whole run alone."""
    from hf_minitron import DistillationTrainer
    from hf_minitron.distillation.teacher_correction import TeacherCorrectionConfig, correct_teacher

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    match = r"WORLD_SIZE=2 processes, but they form a group of 1: without GPUs, set `use_cpu: true`"
    with pytest.raises(ValueError, match=match):
        if trainer == "distillation":
            args = DistillationConfig(output_dir=str(tmp_path), report_to="none")
            DistillationTrainer(model=str(checkpoint), teacher_model=str(checkpoint), args=args)
        else:
            args = TeacherCorrectionConfig(output_dir=str(tmp_path), report_to="none")
            correct_teacher(str(checkpoint), args, train_dataset=None)
