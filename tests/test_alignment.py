import copy
import json
import os
import sys

import pytest
import torch
from conftest import tiny_model
from datasets import Dataset
from peft import LoraConfig
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, TrainerCallback
from trl import SFTConfig

from hf_minitron.alignment import (
    CHATML_TEMPLATE,
    RPOConfig,
    build_preference_dataset,
    build_sft_dataset,
    run_dpo,
    run_sft,
)


RECIPES = os.path.join(os.path.dirname(__file__), "..", "recipes")
# The tiny tokenizer is byte-level (vocab 96): chats are long in tokens, so the tiny models get room for 256.
MAX_LENGTH = 256
COMMON = dict(
    max_steps=2, per_device_train_batch_size=2, learning_rate=1e-2, max_length=MAX_LENGTH, report_to="none",
    save_strategy="no", use_cpu=True, disable_tqdm=True, logging_steps=1, gradient_checkpointing=False,
)  # fmt: skip


@pytest.fixture
def chat_tokenizer(tokenizer):
    # The session tokenizer is shared: the trainers set its chat template / pad token in place.
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def _model():
    return tiny_model("llama", max_position_embeddings=2 * MAX_LENGTH)


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _changed(model, before):
    return [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]


def _assert_stock_checkpoint(directory, model):
    weights = load_file(os.path.join(directory, "model.safetensors"))
    assert not any("lora_" in key for key in weights)
    assert not os.path.exists(os.path.join(directory, "adapter_config.json"))
    assert not [name for name in os.listdir(os.path.dirname(directory)) if ".tmp-" in name]  # no temporary left
    reloaded = AutoModelForCausalLM.from_pretrained(directory)
    assert type(reloaded).__name__ == "LlamaForCausalLM"
    ids = torch.randint(3, 96, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model.eval()(ids).logits)
    return json.loads(open(os.path.join(directory, "log_history.json")).read())


# ---------------------------------------------------------------------------------------------------------- datasets
def test_sft_dataset_is_deterministic_and_well_formed():
    train = build_sft_dataset()
    assert train.to_list() == build_sft_dataset().to_list()
    assert len(train) > 50 and train.column_names == ["messages"]
    for messages in train["messages"]:
        assert [m["role"] for m in messages] == ["user", "assistant"]
        assert all(m["content"].strip() for m in messages)
        assert len(messages[1]["content"]) <= 600 + 200  # the passage cap, plus the lead of a "which section" answer
    kinds = {m[0]["content"].split()[0] for m in train["messages"]}
    assert {"Explain", "What"} <= kinds and any("this passage" in m[0]["content"] for m in train["messages"])
    validation = build_sft_dataset("validation")
    assert not set(map(str, validation["messages"])) & set(map(str, train["messages"]))  # disjoint topics
    assert len(build_sft_dataset(max_samples=5)) == 5


def test_preference_dataset_is_deterministic_and_well_formed():
    pairs = build_preference_dataset()
    assert pairs.to_list() == build_preference_dataset().to_list()
    assert set(pairs.column_names) == {"prompt", "chosen", "rejected"} and len(pairs) > 50
    for row in pairs:
        assert [m["role"] for m in row["prompt"]] == ["user"]
        assert [m["role"] for m in row["chosen"]] == ["assistant"] == [m["role"] for m in row["rejected"]]
        assert row["chosen"][0]["content"] != row["rejected"][0]["content"]
        assert row["chosen"][0]["content"].strip() and row["rejected"][0]["content"].strip()
    chosen = [r["chosen"][0]["content"] for r in pairs]
    rejected = [r["rejected"][0]["content"] for r in pairs]
    assert any(r in chosen for r in rejected)  # another topic's passage
    assert any(c.startswith(r) for c, r in zip(chosen, rejected))  # truncated
    assert any(sorted(c.split()) == sorted(r.split()) and c != r for c, r in zip(chosen, rejected))  # shuffled
    assert build_preference_dataset(seed=1).to_list() != pairs.to_list()  # the seed drives the shuffles


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"split": "test"}, "split"),
        ({"max_samples": 0}, "max_samples"),
        ({"max_answer_chars": 10}, "max_answer_chars"),
    ],
)
def test_dataset_builders_reject_invalid_values(kwargs, field):
    for build in (build_sft_dataset, build_preference_dataset):
        with pytest.raises(ValueError, match=field):
            build(**kwargs)


# --------------------------------------------------------------------------------------------------------------- SFT
def test_sft_full_fine_tuning(tmp_path, chat_tokenizer):
    model = _model()
    before = _snapshot(model)
    args = SFTConfig(output_dir=str(tmp_path), **COMMON)
    tuned = run_sft(model, chat_tokenizer, build_sft_dataset(max_samples=8, max_answer_chars=200), args)
    assert _changed(tuned, before)
    log_history = _assert_stock_checkpoint(str(tmp_path / "final"), tuned)
    assert [entry["loss"] for entry in log_history if "loss" in entry]  # the loss was logged at each step
    assert (tmp_path / "final" / "chat_template.jinja").read_text() == CHATML_TEMPLATE


def test_sft_lora_is_merged_into_a_stock_checkpoint(tmp_path, chat_tokenizer):
    model = _model()
    before = _snapshot(model)
    args = SFTConfig(output_dir=str(tmp_path), **COMMON)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    tuned = run_sft(model, chat_tokenizer, build_sft_dataset(max_samples=8, max_answer_chars=200), args, lora)
    assert type(tuned).__name__ == "LlamaForCausalLM"
    assert any("q_proj" in name for name in _changed(tuned, before))  # the merged adapters moved the weights
    assert not any("lora_" in name for name, _ in tuned.named_parameters())
    log_history = _assert_stock_checkpoint(str(tmp_path / "final"), tuned)
    assert any("loss" in entry for entry in log_history)


def test_sft_assistant_only_loss_with_the_chatml_template(tmp_path, chat_tokenizer):
    args = SFTConfig(output_dir=str(tmp_path), assistant_only_loss=True, **COMMON)
    run_sft(_model(), chat_tokenizer, build_sft_dataset(max_samples=4, max_answer_chars=120), args)
    assert (tmp_path / "final" / "model.safetensors").exists()


def test_missing_chat_template_is_an_error_unless_one_is_given(tmp_path, tokenizer):
    tokenizer = copy.deepcopy(tokenizer)
    assert not tokenizer.chat_template
    data = build_sft_dataset(max_samples=4, max_answer_chars=120)
    args = SFTConfig(output_dir=str(tmp_path), **COMMON)
    with pytest.raises(ValueError, match="chat_template"):
        run_sft(_model(), tokenizer, data, args)
    pairs = build_preference_dataset(max_samples=4, max_answer_chars=120)
    with pytest.raises(ValueError, match="chat_template"):
        run_dpo(_model(), tokenizer, pairs, RPOConfig(output_dir=str(tmp_path), **COMMON))
    with pytest.raises(ValueError, match="chat_template"):
        run_sft(_model(), tokenizer, data, args, chat_template="no-such-template")
    # Plain text needs no template.
    run_sft(_model(), tokenizer, Dataset.from_dict({"text": ["The pass statement does nothing."] * 4}), args)
    # "chatml" is the documented default, set on the tokenizer and saved with the model.
    run_sft(_model(), tokenizer, data, args, chat_template="chatml")
    assert tokenizer.chat_template == CHATML_TEMPLATE


def test_assistant_only_loss_needs_generation_markers(tmp_path, chat_tokenizer):
    chat_tokenizer.chat_template = CHATML_TEMPLATE.replace("{%- generation %}", "").replace("{%- endgeneration %}", "")
    args = SFTConfig(output_dir=str(tmp_path), assistant_only_loss=True, **COMMON)
    with pytest.raises(ValueError, match="assistant_only_loss"):
        run_sft(_model(), chat_tokenizer, build_sft_dataset(max_samples=4), args)


def test_run_sft_rejects_unusable_datasets(tmp_path, chat_tokenizer):
    with pytest.raises(ValueError, match="train_dataset"):
        run_sft(_model(), chat_tokenizer, Dataset.from_dict({"foo": ["x"]}), SFTConfig(str(tmp_path), **COMMON))
    with pytest.raises(ValueError, match="tokenizer"):
        run_sft(_model(), None, build_sft_dataset(max_samples=2), SFTConfig(str(tmp_path), **COMMON))


# --------------------------------------------------------------------------------------------------------------- DPO
class _Logs(TrainerCallback):
    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs or {}))


def test_rpo_config_maps_rpo_alpha_to_an_nll_term(tmp_path):
    args = RPOConfig(output_dir=str(tmp_path), use_cpu=True, rpo_alpha=0.5)
    assert args.loss_type == ["sigmoid", "sft"] and args.loss_weights == [1.0, 0.5]
    assert RPOConfig(output_dir=str(tmp_path), use_cpu=True).loss_type == ["sigmoid"]  # None: plain DPO
    again = RPOConfig(
        output_dir=str(tmp_path), use_cpu=True, rpo_alpha=0.5, loss_type=args.loss_type, loss_weights=args.loss_weights
    )
    assert again.loss_type == ["sigmoid", "sft"] and again.loss_weights == [1.0, 0.5]  # re-validation is idempotent


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"rpo_alpha": -1.0}, "rpo_alpha"),
        ({"rpo_alpha": float("nan")}, "rpo_alpha"),
        ({"rpo_alpha": 0.5, "loss_type": ["sigmoid", "sft"]}, "rpo_alpha"),
        ({"beta": 0.0}, "beta"),
    ],
)
def test_rpo_config_rejects_invalid_values(tmp_path, kwargs, field):
    with pytest.raises(ValueError, match=field):
        RPOConfig(output_dir=str(tmp_path), use_cpu=True, **kwargs)


def test_rpo_trains_the_policy_and_leaves_the_reference_alone(tmp_path, chat_tokenizer):
    model, reference = _model(), _model()
    before, reference_before = _snapshot(model), _snapshot(reference)
    args = RPOConfig(output_dir=str(tmp_path), rpo_alpha=1.0, **COMMON)
    logs = _Logs()
    pairs = build_preference_dataset(max_samples=8, max_answer_chars=200)
    aligned = run_dpo(model, chat_tokenizer, pairs, args, ref_model=reference, callbacks=[logs])
    assert _changed(aligned, before)
    assert not _changed(reference, reference_before)
    step_logs = [entry for entry in logs.logs if "loss" in entry]
    assert len(step_logs) == 2
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen"):
        assert key in step_logs[0]
    # At step 1 the policy equals the reference: the DPO term is log 2 and the rest is the NLL term rpo_alpha adds.
    assert step_logs[0]["loss"] > torch.log(torch.tensor(2.0)).item() + 1.0
    _assert_stock_checkpoint(str(tmp_path / "final"), aligned)


def test_dpo_default_reference_is_a_frozen_copy(tmp_path, chat_tokenizer):
    model = _model()
    before = _snapshot(model)
    logs = _Logs()
    pairs = build_preference_dataset(max_samples=4, max_answer_chars=120)
    aligned = run_dpo(model, chat_tokenizer, pairs, RPOConfig(output_dir=str(tmp_path), **COMMON), callbacks=[logs])
    assert _changed(aligned, before)
    # Step 1 compares the policy with its untouched copy: every implicit reward is exactly 0.
    first = next(entry for entry in logs.logs if "loss" in entry)
    assert first["rewards/chosen"] == 0.0 and first["rewards/rejected"] == 0.0


def test_dpo_lora_is_merged_into_a_stock_checkpoint(tmp_path, chat_tokenizer):
    model = _model()
    before = _snapshot(model)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    pairs = build_preference_dataset(max_samples=4, max_answer_chars=120)
    aligned = run_dpo(model, chat_tokenizer, pairs, RPOConfig(output_dir=str(tmp_path), rpo_alpha=1.0, **COMMON), lora)
    assert type(aligned).__name__ == "LlamaForCausalLM"
    assert any("v_proj" in name for name in _changed(aligned, before))
    _assert_stock_checkpoint(str(tmp_path / "final"), aligned)


def test_run_dpo_rejects_unusable_datasets_and_lengths(tmp_path, chat_tokenizer):
    args = RPOConfig(output_dir=str(tmp_path), **COMMON)
    with pytest.raises(ValueError, match="rejected"):
        run_dpo(_model(), chat_tokenizer, Dataset.from_dict({"prompt": ["a"], "chosen": ["b"]}), args)
    with pytest.raises(ValueError, match="train_dataset"):
        run_dpo(_model(), chat_tokenizer, Dataset.from_dict({"text": ["a"]}), args)
    short = RPOConfig(output_dir=str(tmp_path), **{**COMMON, "max_length": 8})
    with pytest.raises(ValueError, match="max_length"):
        run_dpo(_model(), chat_tokenizer, build_preference_dataset(max_samples=2), short)


# ----------------------------------------------------------------------------------------------------------- recipes
@pytest.mark.parametrize("name, config_class", [("sft", SFTConfig), ("dpo", RPOConfig)])
def test_recipe_yaml_parses_into_the_dataclasses(name, config_class):
    from trl import ModelConfig, TrlParser

    sys.path.insert(0, RECIPES)
    try:
        module = __import__(name)
    finally:
        sys.path.remove(RECIPES)
    parser = TrlParser((module.AlignmentArguments, config_class, ModelConfig))
    config = os.path.join(RECIPES, "smollm2-135m", f"{name}.yaml")
    script_args, args, model_args = parser.parse_args_and_config(["--config", config, "--max_steps", "3"])
    assert model_args.model_name_or_path and script_args.dataset_name == "embedded"
    assert args.max_steps == 3 and args.report_to in ([], "none", ["none"])
    if name == "dpo":
        assert args.rpo_alpha is not None and "sft" in args.loss_type


# ------------------------------------------------------------------------------------------------- real SmolLM2 (slow)
@pytest.mark.slow
def test_smollm2_sft_then_rpo_keeps_its_chat_template(tmp_path):
    from transformers import AutoTokenizer

    from hf_minitron.embedded import resolve_model_path

    small = dict(COMMON, max_steps=1, per_device_train_batch_size=1, learning_rate=1e-5, bf16=False)
    run_sft("embedded", None, build_sft_dataset(max_samples=2), SFTConfig(str(tmp_path / "sft"), **small))
    sft_dir = tmp_path / "sft" / "final"
    pairs = build_preference_dataset(max_samples=2)
    aligned = run_dpo(str(sft_dir), None, pairs, RPOConfig(str(tmp_path / "dpo"), rpo_alpha=1.0, **small))
    original = AutoTokenizer.from_pretrained(resolve_model_path("embedded"))
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "dpo" / "final")
    assert tokenizer.chat_template == original.chat_template  # SmolLM2's own ChatML, untouched
    prompt = tokenizer.apply_chat_template(pairs[0]["prompt"], add_generation_prompt=True, return_tensors="pt")
    ids = prompt["input_ids"] if hasattr(prompt, "keys") else prompt
    out = aligned.generate(ids, max_new_tokens=8, do_sample=False)
    assert out.shape[1] > ids.shape[1]
