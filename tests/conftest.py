import os
from pathlib import Path


# The test tree mirrors the package; files in its subfolders find the shared helpers (`scripts/`, `distill_worker.py`,
# `hub_server.py`) and the repository's recipes from here.
TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent

# Tests never reach the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402


ARCHITECTURE_NAMES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "nemotron", "phi3"]
# The dense families of 2025-2026: a spec entry each, the same tiny-model tests.
ARCHITECTURE_NAMES += [
    "gemma3_text",
    "smollm3",
    "olmo2",
    "olmo3",
    "exaone4",
    "granite",
    "glm4",
    "cohere2",
    "apertus",
    "arcee",
]
MOE_ARCHITECTURE_NAMES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "gpt_oss", "jetmoe"]
MOE_ARCHITECTURE_NAMES += ["minimax_m2", "llama4_text"]
MOE_ARCHITECTURE_NAMES += ["deepseek_v3", "glm4_moe"]
VOCAB_SIZE = 96
# Tiny MoE shapes: 4 routed experts of width 24, 2 per token (each family names its fields its own way).
MOE_OVERRIDES = {
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=24),
    "qwen2_moe": dict(
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24, shared_expert_intermediate_size=40
    ),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24),
    "olmoe": dict(num_experts=4, num_experts_per_tok=2, intermediate_size=24),
    "gpt_oss": dict(
        num_local_experts=4,
        num_experts_per_tok=2,
        intermediate_size=24,
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention"] * 2,
    ),
    # JetMoE: 4 attention experts and 4 MoE experts; head_dim is its kv_channels, and its 4 query heads are the 2 KV
    # heads x 2 experts per token.
    "jetmoe": dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=24),
    "minimax_m2": dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=24),
    # Llama 4: top-1 routing (its default); layer 3 skips RoPE (no_rope_layer_interval=4), the others attend in chunks
    # of 8 tokens, shorter than the tests' inputs. Every layer is MoE; intermediate_size is the shared expert's too.
    "llama4_text": dict(
        num_local_experts=4,
        num_experts_per_tok=1,
        intermediate_size=24,
        intermediate_size_mlp=40,
        attention_chunk_size=8,
    ),
    # DeepSeek-V3: a dense first layer (MLP 64) then MoE layers; 4 experts behind the sigmoid router in one group (its
    # grouped routing is tested with 8 in test_deepseek_v3.py), a shared MLP of 2 x 24; multi-head latent attention
    # with 4 heads (each its own KV head), latents of 16 and 12.
    "deepseek_v3": dict(
        n_routed_experts=4,
        n_group=1,
        topk_group=1,
        num_experts_per_tok=2,
        moe_intermediate_size=24,
        n_shared_experts=2,
        first_k_dense_replace=1,
        num_key_value_heads=4,
        q_lora_rank=16,
        kv_lora_rank=12,
        qk_nope_head_dim=8,
        qk_rope_head_dim=4,
        head_dim=4,  # the config's head_dim is the rotary part (qk_rope_head_dim): the rotary embedding reads it
        v_head_dim=8,
    ),
    # GLM-4.5: DeepSeek-V3's MoE layout (dense first layer, grouped sigmoid router, shared MLP of 2 x 24) with
    # grouped-query attention, q/k/v biases and q/k norms.
    "glm4_moe": dict(
        n_routed_experts=4,
        n_group=1,
        topk_group=1,
        num_experts_per_tok=2,
        moe_intermediate_size=24,
        n_shared_experts=2,
        first_k_dense_replace=1,
        attention_bias=True,
        use_qk_norm=True,
    ),
}

# Hybrid Mamba2-attention families: 5 layers of mixed block types; 8 Mamba heads of dim 4 in 2 B/C groups.
# Bamba and Falcon-H1: their tiny configs and tests are in test_hybrid_families.py.
HYBRID_ARCHITECTURE_NAMES = ["nemotron_h", "bamba", "falcon_h1"]
HYBRID_PATTERN = ["linear_attention", "full_attention", "mlp", "linear_attention", "mlp"]
HYBRID_OVERRIDES = {
    "nemotron_h": dict(
        layers_block_type=HYBRID_PATTERN,
        num_hidden_layers=len(HYBRID_PATTERN),
        mamba_num_heads=8,
        mamba_head_dim=4,
        n_groups=2,
        ssm_state_size=8,
        chunk_size=8,
    ),
}
# Gated DeltaNet hybrids (Qwen3-Next, Qwen3.5's text model): 4 layers, DeltaNet and gated attention alternating; 4
# DeltaNet value heads of dim 8 in 2 key heads of dim 8 (Qwen3-Next: with the MoE shapes of MOE_OVERRIDES).
HYBRID_ARCHITECTURE_NAMES += ["qwen3_next", "qwen3_5_text", "qwen3_5_moe_text"]
DELTANET_PATTERN = ["linear_attention", "full_attention"] * 2
_DELTANET = dict(
    layer_types=DELTANET_PATTERN,
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    linear_key_head_dim=8,
    linear_value_head_dim=8,
    linear_conv_kernel_dim=4,
)
HYBRID_OVERRIDES["qwen3_next"] = dict(
    _DELTANET, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24, shared_expert_intermediate_size=40
)
HYBRID_OVERRIDES["qwen3_5_text"] = _DELTANET
HYBRID_OVERRIDES["qwen3_5_moe_text"] = dict(
    _DELTANET, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24, shared_expert_intermediate_size=40
)
# Granite 4 (Mamba2 or attention, then routed experts and a shared MLP in every layer) and LFM2 (short conv or
# attention, then a SwiGLU MLP whose config width 90 is built 96 wide: block_auto_adjust_ff_dim).
GRANITE4_PATTERN = ["linear_attention", "full_attention", "linear_attention", "linear_attention", "full_attention"]
LFM2_PATTERN = ["conv", "full_attention", "conv", "conv", "full_attention"]
HYBRID_ARCHITECTURE_NAMES += ["granitemoehybrid", "lfm2"]
HYBRID_OVERRIDES |= {
    "granitemoehybrid": dict(
        num_hidden_layers=len(GRANITE4_PATTERN),
        layer_types=GRANITE4_PATTERN,
        num_local_experts=4,
        num_experts_per_tok=2,
        intermediate_size=24,
        shared_intermediate_size=40,
        mamba_n_heads=8,  # 8 x 8 = 64 = mamba_expand (2) x hidden_size
        mamba_d_head=8,
        mamba_n_groups=2,
        mamba_d_state=8,
        mamba_chunk_size=8,
        position_embedding_type="rope",
        embedding_multiplier=1.3,
        residual_multiplier=0.7,
        attention_multiplier=0.3,
        logits_scaling=2.0,
    ),
    "lfm2": dict(
        num_hidden_layers=len(LFM2_PATTERN),
        layer_types=LFM2_PATTERN,
        intermediate_size=90,
        block_multiple_of=8,
        block_ffn_dim_multiplier=1.5,
    ),
}

# Families whose modelling reads one MLP width per layer. Gemma 3n: AltUp over 4 streams, LAuReL of rank 4, per-layer
# inputs of 8 channels, its last 2 layers reusing the keys and values of the first 2 (one sliding, one full); the
# first layer's MLP sparsifies its gate (activation_sparsity_pattern), as the real model's first 10 layers do.
PER_LAYER_ARCHITECTURE_NAMES = ["gemma3n_text"]
PER_LAYER_OVERRIDES = {
    "gemma3n_text": dict(
        vocab_size_per_layer_input=VOCAB_SIZE,
        hidden_size_per_layer_input=8,
        laurel_rank=4,
        altup_num_inputs=4,
        num_kv_shared_layers=2,
        layer_types=["sliding_attention", "full_attention"] * 2,
        sliding_window=8,
        activation_sparsity_pattern=[0.95, 0.0, 0.0, 0.0],
    ),
}


def tiny_config(model_type: str = "llama", **overrides):
    """A tiny random config of `model_type`: hidden 32, 4 layers, 4 heads / 2 KV heads of dim 8, MLP 64."""
    kwargs = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    if model_type in ("gemma2", "gemma3_text"):
        kwargs.update(sliding_window=8, query_pre_attn_scalar=8)
    if model_type in ("gemma3_text", "olmo3", "cohere2", "exaone4"):
        # Alternate sliding and full attention, so depth pruning has a pattern to keep.
        kwargs.update(sliding_window=8, layer_types=["sliding_attention", "full_attention"] * 2)
    if model_type == "smollm3":
        kwargs.update(no_rope_layers=[1, 1, 1, 0])
    if model_type == "qwen3_5_moe_text":
        del kwargs["intermediate_size"]  # its config has none: every feed-forward block is a MoE block
    kwargs.update(MOE_OVERRIDES.get(model_type, {}))
    kwargs.update(HYBRID_OVERRIDES.get(model_type, {}))
    kwargs.update(PER_LAYER_OVERRIDES.get(model_type, {}))
    kwargs.update(overrides)
    return AutoConfig.for_model(model_type, **kwargs)


def tiny_model(model_type: str = "llama", seed: int = 0, **overrides):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides), attn_implementation="eager")
    # Random init leaves norms at 1 and biases at 0: perturb every parameter so that index bugs change outputs.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


def random_samples(n: int = 8, seq_length: int = 16, seed: int = 0, vocab_size: int = VOCAB_SIZE, ragged: bool = True):
    """Tokenized samples with varied lengths (right padding is added by the collator)."""
    g = torch.Generator().manual_seed(seed)
    samples = []
    for i in range(n):
        length = seq_length - (i % 4) * 2 if ragged else seq_length
        ids = torch.randint(3, vocab_size, (length,), generator=g)
        samples.append({"input_ids": ids, "attention_mask": torch.ones(length, dtype=torch.long)})
    return samples


@pytest.fixture(params=ARCHITECTURE_NAMES)
def model_type(request):
    return request.param


@pytest.fixture(params=MOE_ARCHITECTURE_NAMES)
def moe_type(request):
    return request.param


@pytest.fixture
def llama():
    return tiny_model("llama")


def tiny_tokenizer(vocab_size: int = VOCAB_SIZE):
    """A byte-level BPE tokenizer trained offline on the embedded corpus (pad=0, bos=1, eos=2), matching tiny_config."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from hf_minitron.data import load_embedded_corpus

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=[],
        show_progress=False,
    )
    tok.train_from_iterator(load_embedded_corpus()["train"][:5], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="session")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture
def checkpoint(tmp_path, tokenizer):
    """A tiny Llama teacher saved with the offline tokenizer: a local checkpoint for CLI and recipe tests."""
    path = tmp_path / "teacher"
    tiny_model("llama").save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def text_file(tmp_path):
    """A local jsonl corpus (text in the `content` column) of 10 documents of the embedded corpus."""
    import json

    from hf_minitron.data import load_embedded_corpus

    path = tmp_path / "calibration.jsonl"
    with open(path, "w") as f:
        for doc in load_embedded_corpus()["train"][:10]:
            f.write(json.dumps({"content": doc}) + "\n")
    return path


@pytest.fixture
def hub_env(monkeypatch, tmp_path):
    """Network allowed (to 127.0.0.1 only), Xet off, and no token or endpoint from this machine's environment."""
    from huggingface_hub import constants

    # HF_HUB_OFFLINE=1 is set above before import; huggingface_hub reads these constants once, at import.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-stored-tokens"))
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_ENDPOINT", "HF_HUB_OFFLINE", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)


# Helpers shared by test files in several folders.
INPUT_IDS = torch.tensor([[5, 17, 42, 8, 77, 31, 9, 60, 12, 3], [44, 2, 19, 90, 6, 71, 33, 14, 58, 25]])


def n_params(model):
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def logits(model, ids=INPUT_IDS):
    return model(input_ids=ids).logits


def _static_scores(model, heads=None, neurons=None, hidden=None, layers=None):
    from hf_minitron import ImportanceScores
    from hf_minitron.pruning.importance import model_shape

    shape = model_shape(model.config)
    L, H, Inter, nH = (
        shape["num_hidden_layers"],
        shape["hidden_size"],
        shape.get("intermediate_size", 0),  # 0: a family without a dense width (Qwen3.5-MoE)
        shape["num_attention_heads"],
    )
    hidden = torch.zeros(L, H, dtype=torch.float64) if hidden is None else hidden
    return ImportanceScores(
        method="activation",
        sequence_aggregation="mean",
        num_samples=1,
        num_tokens=1,
        model_shape=shape,
        heads={"score": torch.zeros(L, nH, dtype=torch.float64) if heads is None else heads},
        neurons={"score": torch.zeros(L, Inter, dtype=torch.float64) if neurons is None else neurons},
        hidden={"score": torch.stack([hidden, torch.zeros_like(hidden)], dim=1)},
        block_influence=torch.arange(L, dtype=torch.float64) if layers is None else layers,
    )


def _tiny_recipe(checkpoint, output_dir, **top):
    return {
        "teacher": str(checkpoint),
        "output_dir": str(output_dir),
        "seq_length": 32,
        "max_train_samples": 16,
        "max_eval_samples": 4,
        "eval_tasks": "",
        "write_model_card": False,
        **top,
        "pruning": {
            "hidden_size": 24,
            "intermediate_size": 48,
            "num_attention_heads": 2,
            "calibration_samples": 8,
            "calibration_seq_length": 32,
        },
        "distillation": {
            "max_steps": 3,
            "per_device_train_batch_size": 2,
            "report_to": "none",
            "logging_steps": 1,
            "save_steps": 2,
            "learning_rate": 1e-3,
        },
        "teacher_correction": {"max_steps": 2, "per_device_train_batch_size": 2, "report_to": "none"},
    }


# Alignment on the tiny model: its byte-level tokenizer makes chats long in tokens and ships no chat template.
_ALIGNMENT = dict(
    chat_template="chatml", max_length=128, per_device_train_batch_size=2, max_steps=2, learning_rate=1e-2,
    logging_steps=1, save_strategy="no", report_to="none", bf16=False, gradient_checkpointing=False,
)  # fmt: skip
