import os
import subprocess
import sys

import pytest
import torch
from conftest import TESTS, random_samples, tiny_model
from datasets import Dataset
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from hf_minitron import DistillationConfig, DistillationTrainer
from hf_minitron.distillation.trainer import PROJECTION_NAME, DataCollatorForDistillation


def _dataset(n=8, seq_length=16):
    return Dataset.from_list([{k: v.tolist() for k, v in s.items()} for s in random_samples(n, seq_length)])


def _args(tmp_path, **kwargs):
    defaults = dict(
        output_dir=str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        use_cpu=True,
        disable_tqdm=True,
    )
    defaults.update(kwargs)
    return DistillationConfig(**defaults)


def _student(**overrides):
    return tiny_model("llama", seed=1, **{"num_hidden_layers": 2, **overrides})


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_collator_builds_causal_labels_from_attention_mask():
    batch = DataCollatorForDistillation(pad_token_id=2)(
        [{"input_ids": [5, 2, 7], "attention_mask": [1, 1, 1]}, {"input_ids": [4, 2], "attention_mask": [1, 1]}]
    )
    # EOS (= pad id 2) inside a packed sample stays a target; only real padding is -100.
    assert batch["labels"].tolist() == [[5, 2, 7], [4, 2, -100]]
    assert batch["input_ids"].tolist() == [[5, 2, 7], [4, 2, 2]]


def test_train_with_intermediate_loss_and_projection(tmp_path):
    teacher = tiny_model("llama", seed=0)
    student = _student(hidden_size=16, intermediate_size=32, head_dim=4)
    teacher_before = _snapshot(teacher)
    args = _args(
        tmp_path,
        intermediate_layer_mapping="0:1,1:3",
        ce_loss_weight=0.5,
        eval_strategy="steps",
        eval_steps=3,
        save_strategy="steps",
        save_steps=2,
    )
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=args, train_dataset=_dataset(), eval_dataset=_dataset(4)
    )
    assert isinstance(getattr(student, PROJECTION_NAME), torch.nn.Linear)
    student_before = _snapshot(student)
    trainer.train()

    train_logs = [log for log in trainer.state.log_history if "kd_loss" in log]
    assert len(train_logs) == 3
    for log in train_logs:
        for key in ("loss", "kd_loss", "ce_loss", "is_loss", "is_loss_weight"):
            assert key in log and torch.isfinite(torch.tensor(log[key]))
        assert log["kd_loss"] > 0 and log["ce_loss"] > 0 and log["is_loss"] > 0
    eval_log = next(log for log in trainer.state.log_history if "eval_loss" in log)
    assert eval_log["eval_loss"] == pytest.approx(eval_log["eval_ce_loss"])
    assert eval_log["eval_perplexity"] == pytest.approx(torch.tensor(eval_log["eval_loss"]).exp().item(), rel=1e-5)
    assert eval_log["eval_kd_loss"] > 0

    for name, param in student.named_parameters():
        assert not torch.equal(param, student_before[name]), f"{name} was not updated"
    for name, param in teacher.named_parameters():
        assert torch.equal(param, teacher_before[name]) and not param.requires_grad
    assert not teacher.training

    # Checkpoints keep the projection (resume restores it); the final model is a stock checkpoint without it.
    checkpoint = load_file(os.path.join(tmp_path, "checkpoint-2", "model.safetensors"))
    assert any(k.startswith(PROJECTION_NAME) for k in checkpoint)
    final = tmp_path / "final"
    trainer.save_model(str(final))
    assert not any(k.startswith(PROJECTION_NAME) for k in load_file(final / "model.safetensors"))
    assert hasattr(student, PROJECTION_NAME)  # still there for further training
    reloaded = AutoModelForCausalLM.from_pretrained(final)
    ids = torch.randint(3, 96, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, student.eval()(ids).logits)


@pytest.mark.parametrize("kd_loss", ["forward_kl", "reverse_kl", "jsd", "tvd"])
def test_fused_and_unfused_trainers_agree(tmp_path, kd_loss):
    results = []
    for fused in (True, False):
        student = _student()
        args = _args(
            tmp_path / str(fused), max_steps=2, kd_loss=kd_loss, kd_temperature=2.0, ce_loss_weight=0.3,
            use_fused_kd_loss=fused, kd_chunk_size=7, optim="sgd",
        )  # fmt: skip
        trainer = DistillationTrainer(
            model=student, teacher_model=tiny_model("llama"), args=args, train_dataset=_dataset()
        )
        trainer.train()
        results.append((_snapshot(student), [log["loss"] for log in trainer.state.log_history if "kd_loss" in log]))
    (fused_weights, fused_losses), (plain_weights, plain_losses) = results
    assert fused_losses == pytest.approx(plain_losses, rel=1e-5)
    for name in fused_weights:
        torch.testing.assert_close(fused_weights[name], plain_weights[name], rtol=1e-5, atol=1e-6)


def test_gradient_accumulation_is_exact(tmp_path):
    """Batch 4 x GA 1 and batch 2 x GA 2 see the same samples per step (ragged lengths: token counts differ)."""
    weights, losses = [], []
    for batch, accumulation in ((4, 1), (2, 2)):
        student = _student()
        args = _args(
            tmp_path / f"{batch}", max_steps=2, per_device_train_batch_size=batch,
            gradient_accumulation_steps=accumulation, optim="sgd", lr_scheduler_type="constant", ce_loss_weight=1.0,
        )  # fmt: skip
        trainer = DistillationTrainer(
            model=student, teacher_model=tiny_model("llama"), args=args, train_dataset=_dataset()
        )
        trainer.train()
        weights.append(_snapshot(student))
        losses.append([log["loss"] for log in trainer.state.log_history if "kd_loss" in log])
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    for name in weights[0]:
        torch.testing.assert_close(weights[0][name], weights[1][name], rtol=1e-5, atol=1e-6)


def test_resume_from_checkpoint_matches_uninterrupted_run(tmp_path):
    def run(output_dir, resume=None, max_steps=4):
        torch.manual_seed(0)
        student = _student(hidden_size=16, intermediate_size=32, head_dim=4)
        args = _args(
            output_dir, max_steps=max_steps, save_strategy="steps", save_steps=2, intermediate_layer_mapping="1:3",
            intermediate_loss_weight=0.5,
        )  # fmt: skip
        trainer = DistillationTrainer(
            model=student, teacher_model=tiny_model("llama"), args=args, train_dataset=_dataset()
        )
        trainer.train(resume_from_checkpoint=resume)
        return _snapshot(student)

    full = run(tmp_path / "full")
    resumed = run(tmp_path / "resumed", resume=str(tmp_path / "full" / "checkpoint-2"))
    for name in full:  # the projection included: it was restored from the checkpoint
        torch.testing.assert_close(resumed[name], full[name], rtol=1e-6, atol=1e-7)


def test_lora_student(tmp_path):
    from peft import LoraConfig, get_peft_model

    student = get_peft_model(_student(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    before = _snapshot(student)
    trainer = DistillationTrainer(
        model=student, teacher_model=tiny_model("llama"), args=_args(tmp_path, max_steps=2), train_dataset=_dataset()
    )
    trainer.train()
    changed = {n for n, p in student.named_parameters() if not torch.equal(p, before[n])}
    trainable = {n for n, p in student.named_parameters() if p.requires_grad}
    assert trainable and changed == trainable  # every LoRA weight moved, every frozen base weight did not
    assert any("kd_loss" in log for log in trainer.state.log_history)


def test_gradient_checkpointing_matches_plain_run(tmp_path):
    weights = []
    for checkpointing in (False, True):
        student = _student(hidden_size=16, intermediate_size=32, head_dim=4)
        args = _args(
            tmp_path / str(checkpointing), max_steps=2, gradient_checkpointing=checkpointing, optim="sgd",
            intermediate_layer_mapping="0:0,1:2",
        )  # fmt: skip
        trainer = DistillationTrainer(
            model=student, teacher_model=tiny_model("llama"), args=args, train_dataset=_dataset()
        )
        trainer.train()
        weights.append(_snapshot(student))
    for name in weights[0]:
        torch.testing.assert_close(weights[1][name], weights[0][name], rtol=1e-5, atol=1e-6)


def test_gemma2_softcapping_fused_matches_unfused(tmp_path):
    weights = []
    for fused in (True, False):
        student = tiny_model("gemma2", seed=1, num_hidden_layers=2, final_logit_softcapping=3.0)
        teacher = tiny_model("gemma2", seed=0, final_logit_softcapping=3.0)
        args = _args(tmp_path / str(fused), max_steps=1, optim="sgd", use_fused_kd_loss=fused, ce_loss_weight=1.0)
        DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=_dataset()).train()
        weights.append(_snapshot(student))
    for name in weights[0]:
        torch.testing.assert_close(weights[0][name], weights[1][name], rtol=1e-5, atol=1e-6)


def test_incompatible_setups_raise(tmp_path):
    with pytest.raises(ValueError, match="vocabulary"):
        DistillationTrainer(model=_student(), teacher_model=tiny_model("llama", vocab_size=128), args=_args(tmp_path))
    with pytest.raises(ValueError, match="out of range"):
        DistillationTrainer(
            model=_student(), teacher_model=tiny_model("llama"), args=_args(tmp_path, intermediate_layer_mapping="2:0")
        )
    with pytest.raises(ValueError, match="no teacher"):
        DistillationTrainer(model=_student(), args=_args(tmp_path))


def test_padded_teacher_vocab_is_accepted_with_a_matching_tokenizer(tmp_path):
    class Tokenizer:  # only its length matters for the check
        def __len__(self):
            return 90

    teacher = tiny_model("llama", vocab_size=128)
    DistillationTrainer._check_compatibility(_student(), teacher, _args(tmp_path), Tokenizer())


@pytest.mark.distributed
def test_ddp_matches_single_process(tmp_path):
    worker = os.path.join(str(TESTS), "distill_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533"]
    subprocess.run([*torchrun, worker, str(tmp_path / "ddp"), "2", "1"], check=True, env=env, timeout=120)
    subprocess.run([sys.executable, worker, str(tmp_path / "single"), "4", "1"], check=True, env=env, timeout=120)
    ddp = torch.load(tmp_path / "ddp" / "result.pt", weights_only=True)
    single = torch.load(tmp_path / "single" / "result.pt", weights_only=True)
    ddp_loss = [log["loss"] for log in ddp["logs"] if "kd_loss" in log]
    single_loss = [log["loss"] for log in single["logs"] if "kd_loss" in log]
    assert len(ddp_loss) == 2 and ddp_loss == pytest.approx(single_loss, rel=1e-4)
    for name, value in single["state"].items():
        torch.testing.assert_close(ddp["state"][name], value, rtol=1e-4, atol=1e-6)


@pytest.mark.distributed
def test_fsdp2_sharded_teacher_matches_replicated_teacher(tmp_path):
    """The teacher sharded with FSDP2 over 2 CPU processes (gloo) gives the same training as a replicated teacher,
    with the intermediate-state loss hooked on its layers, while each process holds half of every teacher weight."""
    worker = os.path.join(str(TESTS), "distill_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "INTERMEDIATE": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29534"]
    subprocess.run([*torchrun, worker, str(tmp_path / "replicated"), "2", "1"], check=True, env=env, timeout=180)
    env["SHARD_TEACHER"] = "1"
    subprocess.run([*torchrun, worker, str(tmp_path / "sharded"), "2", "1"], check=True, env=env, timeout=180)
    replicated = torch.load(tmp_path / "replicated" / "result.pt", weights_only=True)
    sharded = torch.load(tmp_path / "sharded" / "result.pt", weights_only=True)
    assert [r // 2 for r in replicated["teacher_rows"]] == sharded["teacher_rows"]
    losses = {key: [log[key] for log in replicated["logs"] if key in log] for key in ("kd_loss", "is_loss")}
    assert all(len(values) == 2 for values in losses.values())
    for key, values in losses.items():
        assert [log[key] for log in sharded["logs"] if key in log] == pytest.approx(values, rel=1e-4)
    for name, value in replicated["state"].items():
        torch.testing.assert_close(sharded["state"][name], value, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_real_smollm2_distillation(tmp_path):
    import copy

    from hf_minitron.data import embedded_datasets
    from hf_minitron.embedded import load_default_teacher

    teacher, tokenizer = load_default_teacher()
    student = copy.deepcopy(teacher)
    student.model.layers = student.model.layers[::3]  # 30 -> 10 layers: a crude depth-pruned student
    student.config.num_hidden_layers = len(student.model.layers)
    data = embedded_datasets(tokenizer, seq_length=128, max_train_samples=8)
    args = _args(tmp_path, max_steps=3, per_device_train_batch_size=1, learning_rate=1e-4, eval_strategy="no")
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=args, train_dataset=data["train"], processing_class=tokenizer
    )
    before = trainer.evaluate(data["validation"].select(range(4)))["eval_kd_loss"]
    trainer.train()
    after = trainer.evaluate(data["validation"].select(range(4)))["eval_kd_loss"]
    assert after < before


def test_student_that_is_the_teacher_or_has_nothing_to_train_is_refused(tmp_path):
    """The README pitfall: prune_model prunes in place, so the pruned `teacher` is the student."""
    teacher = tiny_model("llama")
    with pytest.raises(ValueError, match="same model as student and teacher.*copy.deepcopy"):
        DistillationTrainer(model=teacher, teacher_model=teacher, args=_args(tmp_path), train_dataset=_dataset())
    frozen = _student().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        DistillationTrainer(model=frozen, teacher_model=teacher, args=_args(tmp_path), train_dataset=_dataset())


def test_intermediate_states_are_normed_by_the_norm_that_reads_them_and_emb_maps_embeddings(tmp_path):
    """Paper 1 §2.4 compares post-LayerNorm states: layer i's output through layer i+1's input norm (the final norm
    after the last layer), and the embedding output ('emb') through layer 0's input norm."""
    from hf_minitron.distillation.config import EMBEDDING_STATE
    from hf_minitron.distillation.trainer import _HeadCapture

    model = tiny_model("llama")
    ids = torch.arange(3, 19)[None]
    captured = {}
    with torch.no_grad(), _HeadCapture(model, [EMBEDDING_STATE, 0, 3], lambda h, x, s: captured.update(s), False):
        outputs = model(ids, output_hidden_states=True)
    layers = model.model.layers
    hidden = outputs.hidden_states  # [embeddings, layer 0 output, ..., final norm(layer 3 output)]
    torch.testing.assert_close(captured[EMBEDDING_STATE], layers[0].input_layernorm(hidden[0]))
    torch.testing.assert_close(captured[0], layers[1].input_layernorm(hidden[1]))
    torch.testing.assert_close(captured[3], hidden[4])  # the model applies its final norm to the last state

    args = _args(tmp_path, intermediate_layer_mapping="emb:emb,1:3")
    assert args.intermediate_layer_mapping == [(EMBEDDING_STATE, EMBEDDING_STATE), (1, 3)]
    trainer = DistillationTrainer(model=_student(), teacher_model=model, args=args, train_dataset=_dataset())
    trainer.train()
    assert all(log["is_loss"] > 0 for log in trainer.state.log_history if "is_loss" in log)
    with pytest.raises(ValueError, match="maps an embedding output to a layer output"):
        _args(tmp_path, intermediate_layer_mapping="emb:3")


def test_trainer_builds_its_teacher_and_loss_options_once(tmp_path):
    from hf_minitron.distillation.losses import KDLossOptions
    from hf_minitron.distillation.teachers import LiveTeacher

    student = tiny_model("gemma2", seed=1, num_hidden_layers=2, final_logit_softcapping=3.0)
    teacher = tiny_model("gemma2", seed=0, final_logit_softcapping=5.0)
    args = _args(tmp_path, kd_loss="jsd", jsd_beta=0.3, ce_loss_weight=0.5, kd_chunk_size=7)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=_dataset())
    assert type(trainer.teacher) is LiveTeacher and trainer.teacher.unwrapped is teacher
    assert trainer.loss_options == KDLossOptions.from_config(args, student_softcap=3.0, teacher_softcap=5.0)


def test_sharded_teacher_gives_the_live_teacher_loss(tmp_path, monkeypatch):
    """A teacher whose lm_head weight is sharded (FSDP2, ZeRO-3) is a `ShardedTeacher`: the same loss and gradients,
    from a copy of the weight taken inside its forward."""
    import hf_minitron.distillation.trainer as trainer_module
    from hf_minitron.distillation.teachers import LiveTeacher, ShardedTeacher

    batch = DataCollatorForDistillation()(random_samples(4))
    results = []
    for kind in (LiveTeacher, ShardedTeacher):
        sharded = kind is ShardedTeacher
        monkeypatch.setattr(trainer_module, "_is_sharded", lambda param, sharded=sharded: sharded)
        student = _student()
        args = _args(tmp_path / kind.__name__, intermediate_layer_mapping="1:3", ce_loss_weight=0.5)
        trainer = DistillationTrainer(model=student, teacher_model=tiny_model("llama"), args=args)
        assert type(trainer.teacher) is kind
        student.train().zero_grad()
        loss = trainer.compute_loss(student, batch, num_items_in_batch=batch["labels"][:, 1:].ne(-100).sum())
        loss.backward()
        results.append((loss.detach(), *(p.grad for p in student.parameters())))
        assert set(trainer._metrics["train"]) == {"kd_loss", "ce_loss", "is_loss", "is_loss_weight", "tokens"}
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)
