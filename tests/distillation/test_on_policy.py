import copy

import pytest
import torch
from conftest import tiny_model
from datasets import Dataset
from transformers import AutoModelForCausalLM

from hf_minitron.data import load_embedded_corpus, pack_texts
from hf_minitron.distillation.on_policy import OnPolicyConfig, build_on_policy_trainer, prompts_from_samples


def _args(tmp_path, **kwargs):
    defaults = dict(
        output_dir=str(tmp_path / "run"),
        max_steps=2,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        use_cpu=True,
        disable_tqdm=True,
        bf16=False,
        gradient_checkpointing=False,
        prompt_length=8,
        max_completion_length=8,
    )
    defaults.update(kwargs)
    return OnPolicyConfig(**defaults)


@pytest.fixture(scope="module")
def packed(tokenizer):
    return pack_texts(load_embedded_corpus()["train"][:3], tokenizer, 32, 8)


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_trains_the_student_on_its_samples_and_saves_a_stock_checkpoint(tmp_path, tokenizer, packed):
    student, teacher = tiny_model("llama", seed=1), tiny_model("llama", seed=0)
    student_before, teacher_before = _snapshot(student), _snapshot(teacher)
    trainer = build_on_policy_trainer(student, teacher, _args(tmp_path), packed, tokenizer)
    trainer.train()

    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 2 and all(loss > 0 for loss in losses)
    # The student sampled its completions (TRL logs their lengths) and was trained on them; the teacher only scored.
    assert any("completions/mean_length" in entry for entry in trainer.state.log_history)
    assert any(not torch.equal(p, student_before[n]) for n, p in student.named_parameters())
    assert all(torch.equal(p, teacher_before[n]) for n, p in teacher.named_parameters())
    trainer.save_model(str(tmp_path / "final"))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    assert all(torch.equal(p, student.state_dict()[n]) for n, p in reloaded.state_dict().items())


@pytest.mark.parametrize("beta", [1.0, 0.5])
def test_a_student_equal_to_its_teacher_has_zero_loss(tmp_path, tokenizer, packed, beta):
    # Reverse KL and the generalised JSD both vanish when the two distributions are the same, on any samples.
    student = tiny_model("llama", seed=0)
    trainer = build_on_policy_trainer(
        student, copy.deepcopy(student), _args(tmp_path, max_steps=1, beta=beta), packed, tokenizer
    )
    trainer.train()
    (loss,) = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert abs(loss) < 1e-6


def test_prompts_are_cut_from_packed_samples(tokenizer, packed):
    prompts = prompts_from_samples(packed, tokenizer, 5)
    assert prompts.column_names == ["prompt"] and len(prompts) == len(packed)
    assert tokenizer(prompts[0]["prompt"], add_special_tokens=False)["input_ids"] == packed[0]["input_ids"][:5]
    given = Dataset.from_dict({"prompt": ["def f(x):"]})
    assert prompts_from_samples(given, tokenizer, 5) is given


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(beta=1.5), r"OnPolicyConfig.beta=1.5 is invalid: use a value in \[0, 1\]"),
        (dict(prompt_length=0), r"OnPolicyConfig.prompt_length=0 is invalid"),
        (dict(max_completion_length=0), r"OnPolicyConfig.max_completion_length=0 is invalid"),
        (dict(temperature=0.0), r"OnPolicyConfig.temperature=0.0 is invalid"),
    ],
)
def test_bad_config_values_name_the_field(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        _args(tmp_path, **kwargs)


def test_bad_inputs_are_refused_before_any_forward(tmp_path, tokenizer, packed, monkeypatch):
    from transformers import LlamaForCausalLM

    def forbidden(*args, **kwargs):
        raise AssertionError("a model ran before the inputs were checked")

    monkeypatch.setattr(LlamaForCausalLM, "forward", forbidden)
    student, teacher = tiny_model("llama", seed=1), tiny_model("llama", seed=0)
    args = _args(tmp_path)
    with pytest.raises(ValueError, match=r"vocab_size=.* differs from the teacher's vocab_size"):
        build_on_policy_trainer(student, tiny_model("llama", vocab_size=300), args, packed, tokenizer)
    with pytest.raises(ValueError, match=r"prompt_length \+ max_completion_length = 8 \+ 200 = 208 exceeds"):
        build_on_policy_trainer(student, teacher, _args(tmp_path, max_completion_length=200), packed, tokenizer)
    with pytest.raises(ValueError, match=r"needs a 'prompt' column \(text\) or packed 'input_ids'"):
        build_on_policy_trainer(student, teacher, args, Dataset.from_dict({"text": ["a b"]}), tokenizer)
    with pytest.raises(ValueError, match=r"needs a live teacher"):
        build_on_policy_trainer(student, teacher, args, packed.add_column("teacher_hidden", [[0.0]] * 8), tokenizer)
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "teacher_cache.json").write_text("{}")
    with pytest.raises(ValueError, match=r"needs a live teacher"):
        build_on_policy_trainer(student, str(cache), args, packed, tokenizer)
