"""The bad-input catalog, Python API side: field types, calibration batches, models, importance scores
and files we read back. Every case raises hf-minitron's own ValueError/TypeError naming the field or file, the value
and the fix, before any forward pass (a hook on the embedding fails the test if one runs)."""

import json

import pytest
import torch
from conftest import VOCAB_SIZE, random_samples, tiny_config, tiny_model, tiny_tokenizer

from hf_minitron import ImportanceScores, PrunedConfig, estimate_importance, load_pruning_record, prune_model


@pytest.fixture
def model():
    """A tiny Llama whose embedding refuses to run: every case must fail before a forward pass."""
    m = tiny_model("llama")

    def no_forward(module, args):
        raise AssertionError("a forward pass ran although the input was already known to be bad")

    m.get_input_embeddings().register_forward_pre_hook(no_forward)
    return m


# ---------------------------------------------------------------------------------------------- field types
@pytest.mark.parametrize(
    "field,value",
    [
        ("hidden_size", True),
        ("hidden_size", 16.0),
        ("hidden_size", "16"),
        ("num_attention_heads", 2.5),
        ("num_experts", 2.0),
        ("calibration_samples", True),
        ("calibration_batch_size", 2.5),
        ("calibration_seq_length", "512"),
        ("depth_calibration_samples", False),
        ("seed", "0"),
        ("seed", True),
        ("head_merge", "yes"),
        ("expert_importance", "l2"),
        ("importance", "activations"),
        ("layers_to_drop", "12"),
    ],
)
def test_pruned_config_field_types(field, value):
    with pytest.raises(ValueError, match=rf"PrunedConfig\.{field}={value!r}".replace("[", r"\[")) as error:
        PrunedConfig(**{field: value})
    assert (
        "expected" in str(error.value) or "choose one of" in str(error.value) or "is not supported" in str(error.value)
    )


# ---------------------------------------------------------------------------------------------- calibration batches
def _sample(ids, mask=None):
    sample = {"input_ids": torch.as_tensor(ids)}
    if mask is not None:
        sample["attention_mask"] = torch.as_tensor(mask)
    return sample


@pytest.mark.parametrize(
    "samples,message",
    [
        ([_sample([3, 4, VOCAB_SIZE])], rf"token id {VOCAB_SIZE}, outside the model's vocabulary \[0, {VOCAB_SIZE}\)"),
        ([_sample([3, -1, 5])], r"token id -1, outside the model's vocabulary"),
        ([_sample([3.0, 4.0, 5.0])], r"input_ids hold float32 values: token ids must be integers"),
        ([_sample([3, 4, 5], [1, 1])], r"attention_mask has shape \(2,\) but input_ids has shape \(3,\)"),
        ([_sample([3, 4, 5], [1, 2, 1])], r"attention_mask holds values \[2.0\]: it must be 0 \(padding\) or 1"),
        ([_sample([3, 4, 5], [0.5, 1, 1])], r"attention_mask holds values \[0.5\]"),
        ([_sample([3, 4, 5], [0, 0, 0])], r"every sample is fully masked"),
        ([], r"calibration data is empty"),
        (["some raw text"], r"Calibration samples must be mappings with an 'input_ids' entry"),
        ([_sample(list(range(3, 90)) * 2)], r"longer than the model's max_position_embeddings=128"),
    ],
)
@pytest.mark.parametrize("entry", ["estimate_importance", "prune_model"])
def test_bad_calibration_batches(model, samples, message, entry):
    config = PrunedConfig(intermediate_size=32, calibration_samples=4)
    with pytest.raises(ValueError, match=message):
        if entry == "estimate_importance":
            estimate_importance(model, samples, config, show_progress=False)
        else:
            prune_model(model, config, samples, show_progress=False)
    assert model.config.intermediate_size == 64  # nothing was sliced


def test_token_ids_of_padded_positions_are_checked_too(model):
    # The embedding looks up every position, padded or not: a pad id past the vocabulary fails as a real token would.
    sample = _sample([3, 4, 5, 0], [1, 1, 1, 0])
    sample["input_ids"][3] = VOCAB_SIZE + 7
    with pytest.raises(ValueError, match=f"token id {VOCAB_SIZE + 7}"):
        estimate_importance(model, [sample], PrunedConfig(calibration_samples=1), show_progress=False)


def test_the_tokenizers_own_output_is_accepted_as_calibration_data():
    tokenizer = tiny_tokenizer()
    texts = ["def f(x):\n    return x + 1", "The quick brown fox jumps over the lazy dog."]
    batch = tokenizer(texts, padding=True, return_tensors="pt")  # a BatchEncoding: one padded batch
    config = PrunedConfig(calibration_samples=2, calibration_batch_size=2)
    from_batch = estimate_importance(tiny_model("llama"), batch, config, show_progress=False)
    per_row = [tokenizer(t) for t in texts]  # BatchEncoding rows, lists of ints
    from_rows = estimate_importance(tiny_model("llama"), per_row, config, show_progress=False)
    assert from_batch.num_tokens == from_rows.num_tokens == int(batch["attention_mask"].sum())
    torch.testing.assert_close(from_batch.neuron_scores(), from_rows.neuron_scores())


# ---------------------------------------------------------------------------------------------- models
def _base_model():
    from transformers import AutoModel

    return AutoModel.from_config(tiny_config("llama"))


def _meta_model():
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        return AutoModelForCausalLM.from_config(tiny_config("llama"))


@pytest.mark.parametrize(
    "make,error,message",
    [
        (
            lambda tmp: str(tmp),
            TypeError,
            r"takes a loaded model, got the path .*AutoModelForCausalLM.from_pretrained",
        ),
        (lambda tmp: tmp, TypeError, r"takes a loaded model, got the path"),
        (lambda tmp: _base_model(), TypeError, r"got the base model LlamaModel"),
        (lambda tmp: torch.nn.Linear(4, 4), TypeError, r"takes a transformers `\*ForCausalLM` model, got Linear"),
        (lambda tmp: _meta_model(), ValueError, r"all on the 'meta' device"),
    ],
)
@pytest.mark.parametrize("entry", ["estimate_importance", "prune_model"])
def test_what_is_not_a_loaded_causal_lm_is_refused(tmp_path, make, error, message, entry):
    target = make(tmp_path)
    with pytest.raises(error, match=message):
        if entry == "estimate_importance":
            estimate_importance(target, random_samples(2), show_progress=False)
        else:
            prune_model(target, PrunedConfig(intermediate_size=32), random_samples(2), show_progress=False)


def test_config_of_the_wrong_type_is_refused(model):
    with pytest.raises(TypeError, match="config must be a PrunedConfig, got dict"):
        estimate_importance(model, random_samples(2), {"calibration_samples": 2})
    with pytest.raises(TypeError, match="config must be a PrunedConfig, got dict"):
        prune_model(model, {"intermediate_size": 32}, random_samples(2))


# ---------------------------------------------------------------------------------------------- importance scores
@pytest.fixture
def scores():
    return estimate_importance(tiny_model("llama"), random_samples(4), PrunedConfig(), show_progress=False)


def test_scores_from_a_model_with_other_weights_are_refused(scores, model):
    other = tiny_model("llama", seed=3)  # same shape, other weights (e.g. after teacher correction)
    with pytest.raises(ValueError, match="same shape but other weights"):
        prune_model(other, PrunedConfig(intermediate_size=32), scores=scores)
    assert other.config.intermediate_size == 64
    same_weights_in_bf16 = tiny_model("llama").to(torch.bfloat16)
    prune_model(same_weights_in_bf16, PrunedConfig(intermediate_size=32), scores=scores)  # same model, other dtype


def test_scores_survive_save_and_load_with_their_fingerprint(scores, tmp_path):
    scores.save(tmp_path)
    assert ImportanceScores.load(tmp_path).model_fingerprint == scores.model_fingerprint is not None
    with pytest.raises(ValueError, match="other weights"):
        prune_model(
            tiny_model("llama", seed=5), PrunedConfig(intermediate_size=32), scores=ImportanceScores.load(tmp_path)
        )


def test_scores_whose_tensors_do_not_fit_the_model_are_refused(scores):
    scores.neurons = {k: v[:, :48] for k, v in scores.neurons.items()}  # hand-edited: 48 of 64 neurons
    with pytest.raises(ValueError, match=r"neurons.sum has shape \(4, 48\), but this model needs \(4, 64\)"):
        prune_model(tiny_model("llama"), PrunedConfig(intermediate_size=32), scores=scores)


def test_scores_of_the_wrong_type_are_refused(model):
    with pytest.raises(TypeError, match="scores must be ImportanceScores"):
        prune_model(model, PrunedConfig(intermediate_size=32), scores={"heads": torch.zeros(4, 4)})


@pytest.mark.parametrize(
    "damage,message",
    [
        (lambda d: (d / "importance.safetensors").write_bytes((d / "importance.safetensors").read_bytes()[:100]), ""),
        (lambda d: (d / "importance.json").write_text('{"method": "activation"'), ""),
        (lambda d: (d / "importance.json").write_text(json.dumps({"method": "activation"})), "missing"),
    ],
    ids=["truncated-weights", "truncated-json", "edited-json"],
)
def test_damaged_score_files_name_the_file(scores, tmp_path, damage, message):
    scores.save(tmp_path)
    damage(tmp_path)
    with pytest.raises(ValueError, match=r"truncated or edited by hand: estimate the scores again") as error:
        ImportanceScores.load(tmp_path)
    assert str(tmp_path) in str(error.value) and message in str(error.value)


@pytest.mark.parametrize("name", ["pruned_config.json", "pruning_record.json"])
def test_damaged_pruning_files_name_the_file(tmp_path, name):
    model = tiny_model("llama")
    prune_model(model, PrunedConfig(intermediate_size=32, importance="magnitude"))
    model.save_pretrained(tmp_path)
    load_pruning_record(tmp_path)  # intact: loads
    path = tmp_path / name
    path.write_text(path.read_text()[:40])
    with pytest.raises(ValueError, match=r"truncated or edited by hand") as error:
        load_pruning_record(tmp_path)
    assert name in str(error.value)


def test_unknown_lm_eval_task_is_refused_before_any_model_loads(monkeypatch, tmp_path):
    from transformers import AutoModelForCausalLM

    from hf_minitron.commands.evaluate import EvaluateArguments, evaluate_checkpoints
    from hf_minitron.evaluation import check_task_names

    check_task_names(["pydoc_topics"])  # ours: no lm-eval index needed
    with pytest.raises(ValueError, match=r"Unknown lm-eval task\(s\): 'pydoc_topcs' \(did you mean 'pydoc_topics'"):
        check_task_names(["pydoc_topcs"])

    def forbidden(*args, **kwargs):
        raise AssertionError("a model was loaded although the task name was already known to be bad")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", forbidden)
    args = EvaluateArguments(model=str(tmp_path), tasks="pydoc_topcs", output_file=str(tmp_path / "e.json"))
    with pytest.raises(ValueError, match="Unknown lm-eval task"):
        evaluate_checkpoints(args, show_progress=False)


@pytest.mark.parametrize(
    "recipe,section",
    [({"sft": 5}, "sft"), ({"pruning": [1, 2]}, "pruning"), ({"distillation": "fast"}, "distillation")],
)
def test_recipe_sections_of_the_wrong_yaml_type_are_named(recipe, section):
    from hf_minitron.commands.run_config import build_pipeline_config

    with pytest.raises(ValueError, match=rf"The '{section}' section of the recipe is a \w+ .*must be a mapping"):
        build_pipeline_config(recipe)
