"""A family outside `ARCHITECTURES`, with its own modelling code (like FuxiTranyu-8B: model_type `fuxitranyu`, MHA with
attention biases, a non-gated `gelu_fast` MLP), described by an `ArchitectureSpec` passed in as `spec=`.

The test writes a tiny remote-code model itself (configuration + modelling files, `auto_map`), loads it only with
`trust_remote_code=True`, prunes it, and reloads the pruned checkpoint the same way.
"""

import json

import pytest
import torch
from conftest import INPUT_IDS, logits, n_params, random_samples
from transformers import AutoConfig, AutoModelForCausalLM

from hf_minitron import (
    ArchitectureSpec,
    PrunedConfig,
    estimate_importance,
    get_architecture,
    load_pruning_record,
    magnitude_importance,
    prune_model,
    random_importance,
)
from hf_minitron.pruning.parameter_count import count_parameters


CONFIGURATION = """
from transformers import PretrainedConfig


class TinyCustomConfig(PretrainedConfig):
    model_type = "tinycustom"

    def __init__(
        self,
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        head_dim=None,
        hidden_act="gelu_fast",
        layer_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.head_dim = head_dim
        self.hidden_act = hidden_act
        self.layer_norm_eps = layer_norm_eps
        self.rope_theta = rope_theta
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
"""

MODELING = """
import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_tinycustom import TinyCustomConfig


def rotate(x, theta):
    half = x.shape[-1] // 2
    freqs = theta ** (-torch.arange(half, dtype=torch.float32, device=x.device) / half)
    angles = torch.arange(x.shape[-2], device=x.device)[:, None].float() * freqs[None]
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class TinyCustomAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim or config.hidden_size // config.num_attention_heads
        self.rope_theta = config.rope_theta
        inner = self.num_heads * self.head_dim
        self.query = nn.Linear(config.hidden_size, inner, bias=True)
        self.key = nn.Linear(config.hidden_size, inner, bias=True)
        self.value = nn.Linear(config.hidden_size, inner, bias=True)
        self.dense = nn.Linear(inner, config.hidden_size, bias=True)

    def forward(self, x, mask):
        b, s, _ = x.shape
        q, k, v = (
            proj(x).view(b, s, self.num_heads, self.head_dim).transpose(1, 2)
            for proj in (self.query, self.key, self.value)
        )
        q, k = rotate(q, self.rope_theta), rotate(k, self.rope_theta)
        weights = (q @ k.transpose(-1, -2)) / self.head_dim**0.5 + mask
        out = weights.softmax(dim=-1) @ v
        return self.dense(out.transpose(1, 2).reshape(b, s, self.num_heads * self.head_dim))


class TinyCustomMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.fc_in = nn.Linear(config.hidden_size, config.intermediate_size, bias=True)
        self.fc_out = nn.Linear(config.intermediate_size, config.hidden_size, bias=True)
        self.act = ACT2FN[config.hidden_act]

    def forward(self, x):
        return self.fc_out(self.act(self.fc_in(x)))


class TinyCustomBlock(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attn = TinyCustomAttention(config)
        self.ln_2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.ffn = TinyCustomMLP(config)

    def forward(self, hidden_states, mask):
        hidden_states = hidden_states + self.attn(self.ln_1(hidden_states), mask)
        return hidden_states + self.ffn(self.ln_2(hidden_states))


class TinyCustomPreTrainedModel(PreTrainedModel):
    config_class = TinyCustomConfig
    base_model_prefix = "model"

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(0.0, 0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            module.bias.data.zero_()


class TinyCustomModel(TinyCustomPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([TinyCustomBlock(config) for _ in range(config.num_hidden_layers)])
        self.ln_f = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(self, input_ids, attention_mask=None, **kwargs):
        x = self.embed_tokens(input_ids)
        s = input_ids.shape[1]
        allowed = torch.ones(s, s, dtype=torch.bool, device=x.device).tril()[None, None]
        if attention_mask is not None:
            allowed = allowed & attention_mask[:, None, None, :].bool()
        mask = torch.zeros(allowed.shape, dtype=x.dtype, device=x.device)
        mask = mask.masked_fill(~allowed, torch.finfo(x.dtype).min)
        for layer in self.layers:
            x = layer(x, mask)
        return self.ln_f(x)


class TinyCustomForCausalLM(TinyCustomPreTrainedModel, GenerationMixin):
    def __init__(self, config):
        super().__init__(config)
        self.model = TinyCustomModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(self, input_ids, attention_mask=None, labels=None, **kwargs):
        logits = self.lm_head(self.model(input_ids, attention_mask))
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1), ignore_index=-100
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits)
"""

AUTO_MAP = {
    "AutoConfig": "configuration_tinycustom.TinyCustomConfig",
    "AutoModelForCausalLM": "modeling_tinycustom.TinyCustomForCausalLM",
}
CODE_FILES = ("configuration_tinycustom.py", "modeling_tinycustom.py")

# Where the family's modules live: the user's own description, passed in (nothing is registered).
SPEC = ArchitectureSpec(
    attention="attn",
    q_proj="query",
    k_proj="key",
    v_proj="value",
    o_proj="dense",
    mlp="ffn",
    gate_proj=None,
    up_proj="fc_in",
    down_proj="fc_out",
    attn_input_norm="ln_1",
    mlp_input_norm="ln_2",
    residual_norms=("ln_1", "ln_2"),
    final_norm="ln_f",
    notes="MHA with q/k/v/o biases, non-gated gelu_fast MLP, LayerNorms with biases",
)
# MHA: pruning heads removes whole KV "groups" of one head, so both counts are set.
TARGET = dict(num_attention_heads=2, num_key_value_heads=2, intermediate_size=32, hidden_size=16)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """A checkpoint with remote code: the two code files, `auto_map` in config.json, perturbed random weights."""
    source = tmp_path_factory.mktemp("tinycustom_source")
    (source / CODE_FILES[0]).write_text(CONFIGURATION)
    (source / CODE_FILES[1]).write_text(MODELING)
    config = dict(model_type="tinycustom", architectures=["TinyCustomForCausalLM"], auto_map=AUTO_MAP)
    (source / "config.json").write_text(json.dumps(config))
    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(source, trust_remote_code=True)
    model = AutoModelForCausalLM.from_config(config, trust_remote_code=True)
    with torch.no_grad():
        for p in model.parameters():  # biases and norms away from their init, so index bugs change outputs
            p.add_(torch.randn_like(p) * 0.02)
    teacher = tmp_path_factory.mktemp("tinycustom_teacher")
    model.save_pretrained(teacher)
    return teacher


def load(path):
    return AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()


def test_remote_code_runs_only_when_trusted(teacher_dir):
    assert all((teacher_dir / name).is_file() for name in CODE_FILES)
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        AutoModelForCausalLM.from_pretrained(teacher_dir, trust_remote_code=False)


def test_without_a_spec_the_family_is_refused_with_the_supported_list_and_the_hint(teacher_dir):
    model = load(teacher_dir)
    hint = r"Unsupported architecture: model_type='tinycustom'\. hf-minitron supports .*llama.*qwen3.*spec=ArchitectureSpec"
    with pytest.raises(ValueError, match=hint):
        prune_model(model, PrunedConfig(**TARGET), random_samples(4), show_progress=False)
    with pytest.raises(ValueError, match=hint):
        estimate_importance(model, random_samples(4), show_progress=False)
    with pytest.raises(ValueError, match=hint):
        count_parameters(model.config, PrunedConfig(**TARGET))


def test_a_spec_passed_in_must_describe_a_dense_family(teacher_dir):
    config = AutoConfig.from_pretrained(teacher_dir, trust_remote_code=True)
    assert get_architecture(config, SPEC) is SPEC
    with pytest.raises(TypeError, match="spec must be an ArchitectureSpec, got str"):
        get_architecture(config, "llama")
    with pytest.raises(ValueError, match=r"sets moe: a spec passed in describes a dense family"):
        get_architecture(config, ArchitectureSpec(mlp=None, moe="mlp"))


def test_identity_pruning_with_the_spec_is_exact(teacher_dir, tmp_path):
    model = load(teacher_dir)
    reference = logits(model)
    pruned = prune_model(model, PrunedConfig(calibration_samples=4), random_samples(4), show_progress=False, spec=SPEC)
    assert torch.equal(logits(pruned), reference)
    pruned.save_pretrained(tmp_path)
    assert torch.equal(logits(load(tmp_path)), reference)


@pytest.mark.parametrize("head_merge", ["none", "query"])
def test_prune_heads_mlp_hidden_and_depth_then_reload_with_the_remote_code(teacher_dir, tmp_path, head_merge):
    model = load(teacher_dir)
    source_config = model.config
    config = PrunedConfig(**TARGET, num_hidden_layers=3, calibration_samples=8, head_merge=head_merge)
    pruned = prune_model(model, config, random_samples(8), show_progress=False, spec=SPEC)
    layer = pruned.model.layers[0]
    assert layer.attn.query.weight.shape == (16, 16) and layer.attn.query.bias.shape == (16,)
    assert layer.attn.dense.weight.shape == (16, 16) and layer.attn.dense.bias.shape == (16,)
    assert layer.ffn.fc_in.weight.shape == (32, 16) and layer.ffn.fc_out.weight.shape == (16, 32)
    assert layer.ln_1.weight.shape == layer.ln_1.bias.shape == (16,) and len(pruned.model.layers) == 3
    assert layer.attn.num_heads == 2  # the size the module cached at init follows the config
    assert count_parameters(source_config, config, spec=SPEC) == n_params(pruned)

    pruned.save_pretrained(tmp_path)
    # The checkpoint keeps the remote code and auto_map, so it reloads exactly as the source did.
    assert all((tmp_path / name).read_text() == (teacher_dir / name).read_text() for name in CODE_FILES)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["auto_map"] == AUTO_MAP and saved["model_type"] == "tinycustom"
    assert saved["num_attention_heads"] == 2 and saved["hidden_size"] == 16 and saved["head_dim"] == 8
    reloaded = load(tmp_path)
    assert type(reloaded).__name__ == "TinyCustomForCausalLM"
    torch.testing.assert_close(logits(reloaded), logits(pruned))
    assert load_pruning_record(tmp_path)[0] == config


def test_kept_heads_are_the_sliced_originals(teacher_dir):
    model = load(teacher_dir)
    source = {name: getattr(model.model.layers[0].attn, name).weight.detach().clone() for name in ("query", "dense")}
    scores = estimate_importance(model, random_samples(8), PrunedConfig(calibration_samples=8), spec=SPEC)
    pruned = prune_model(model, PrunedConfig(num_attention_heads=2, num_key_value_heads=2), scores=scores, spec=SPEC)
    kept = pruned.pruning_record.heads[0]
    assert kept == pruned.pruning_record.kv_heads[0]
    rows = torch.cat([torch.arange(h * 8, (h + 1) * 8) for h in kept])
    attn = pruned.model.layers[0].attn
    torch.testing.assert_close(attn.query.weight, source["query"][rows])
    torch.testing.assert_close(attn.dense.weight, source["dense"][:, rows])


@pytest.mark.parametrize("importance", ["magnitude", "random"])
def test_baselines_take_the_spec(teacher_dir, importance):
    model = load(teacher_dir)
    if importance == "magnitude":
        scores = magnitude_importance(model, spec=SPEC)
    else:
        scores = random_importance(model.config, spec=SPEC)
    assert scores.heads["score"].shape == (4, 4) and scores.neurons["score"].shape == (4, 64)
    pruned = prune_model(model, PrunedConfig(importance=importance, **TARGET), spec=SPEC)
    assert pruned(input_ids=INPUT_IDS).logits.shape == (2, 10, 96)


def test_count_parameters_of_the_source_with_the_spec(teacher_dir):
    model = load(teacher_dir)
    assert count_parameters(model.config, spec=SPEC) == n_params(model)
