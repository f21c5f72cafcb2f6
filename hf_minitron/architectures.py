"""Per-architecture knowledge, as data.

Everything the importance estimator and the pruner need to know about a decoder family lives in one
`ArchitectureSpec`: which submodules are the attention and MLP projections, whether they are fused, which norms
feed attention and the MLP, which norms sit on the residual stream. Adding an architecture means adding one entry
to `ARCHITECTURES` (and its tiny-model test); nothing else in the package branches on `model_type`. A family of the
user's own (remote code) is described by a spec passed in as `spec=` (see `get_architecture`), never registered.

Past 500 lines because it is a table: one `ArchitectureSpec` entry per family; the code around it is
small.
"""

from dataclasses import dataclass, field

from torch import nn


@dataclass(frozen=True)
class ParallelExperts:
    """Routed experts stored ScatterMoE-style (JetMoE's `JetMoeParallelExperts`, also the layout of MegaBlocks and
    vLLM's fused MoE kernel), as opposed to transformers 5's experts module (`use_experts_implementation`).

    Two modules hold the experts' projections as one `weight` `[experts, out, in]` each and are called on the tokens
    sorted by expert with the number of tokens per expert; a top-k gating module holds the router `Linear(hidden,
    experts)` and returns `(sorted slots, token index, gates, tokens per expert, logits)`. The block adds one output
    `bias` `[hidden]` after combining the experts. Paths are relative to the block (the MoE block, or the mixture of
    attention experts).

    Args:
        first, second (`str`):
            The modules of the first projection (`[E, 2 x width, hidden]`, gate then up, when `gated`) and of the
            second one (`[E, hidden, width]`); their `weight` is pruned.
        gating (`str`):
            The top-k gating module (its output gives the routing the importance hooks read).
        router (`str`):
            The router `Linear(hidden, experts)` (rows: experts; columns: hidden channels).
        output_bias (`str`):
            The `[hidden]` bias the block adds to its output.
        gated (`bool`):
            The first projection is `[gate; up]` (concatenated) feeding `act(gate) * up` (JetMoE's MoE); `False` for a
            single projection (the query projection of a mixture of attention experts).
    """

    first: str = "input_linear"
    second: str = "output_linear"
    gating: str = "router"
    router: str = "router.layer"
    output_bias: str = "bias"
    gated: bool = True


@dataclass(frozen=True)
class ArchitectureSpec:
    """Where the prunable structures of one decoder family live.

    Args:
        q_proj, k_proj, v_proj (`str` or `None`):
            Names of the separate query/key/value projections inside the attention module, or `None` when fused.
        qkv_proj (`str` or `None`):
            Name of a fused projection whose output rows are `[q (heads * head_dim), k, v (kv_heads * head_dim)]`.
        o_proj (`str`):
            Output projection of attention. Its *input* carries the per-head activations used for head importance.
        gate_proj, up_proj (`str` or `None`):
            MLP input projections. `gate_proj` is `None` for non-gated MLPs (Nemotron).
        gate_up_proj (`str` or `None`):
            A fused `[gate (intermediate), up (intermediate)]` projection (Phi-3).
        down_proj (`str`):
            MLP output projection. Its *input* carries the neuron activations used for neuron importance.
        attn_input_norm, mlp_input_norm (`str` or `None`):
            The norms whose outputs feed attention and the MLP: their outputs give embedding-channel importance
            (paper 1, §2.2). `None` for post-norm families (OLMo 2/3, EXAONE 4): the inputs of attention and the MLP
            are scored instead.
        residual_norms (`tuple[str, ...]`):
            Every per-layer norm over the hidden size (all are sliced when hidden channels are pruned).
        embedding_scale_sqrt_hidden (`bool`):
            The embedding module multiplies by `sqrt(hidden_size)` (Gemma): it is reset after hidden pruning.
        attention_head_parameters (`tuple[str, ...]`):
            1-D parameters of the attention module with one value per query head (GPT-OSS `sinks`): sliced with the
            heads.
        qk_norm_over_heads (`bool`):
            `q_norm` / `k_norm` act over all heads x head_dim (OLMo 2, OLMoE), not per head: sliced with the heads.
        head_dim_from_hidden (`bool`):
            The modeling code derives `head_dim` from `hidden_size // num_attention_heads` (OLMoE): a pruned
            `hidden_size` must then equal the pruned `num_attention_heads * head_dim`.
        moe (`str`, *optional*):
            The sparse MoE block inside a decoder layer (a transformers 5 `*SparseMoeBlock` / `*MLP` holding a router
            and an experts module whose weights are fused 3-D parameters `[experts, ...]`).
        router, experts (`str`):
            The router (`weight` `[experts, hidden]`, optional `bias`) and the experts module inside `moe`.
        shared_expert, shared_expert_gate (`str`, *optional*):
            An always-active MLP inside `moe` (Qwen2-MoE) and its sigmoid gate `Linear(hidden, 1)`.
        shared_expert_in_layer (`bool`):
            `shared_expert` is a module of the decoder layer beside `moe`, not inside it (Granite 4's `shared_mlp`,
            whose output the layer adds to the MoE block's).
        num_experts_field, expert_width_field, shared_expert_width_field (`str`):
            The config fields holding the routed-expert count, each routed expert's FFN width and the shared
            expert's width (Mixtral: `num_local_experts` and `intermediate_size`; Qwen-MoE: `num_experts` and
            `moe_intermediate_size`). `PrunedConfig` names them the same for every family.
        shared_expert_count_field (`str`, *optional*):
            A config field by which the modeling code multiplies the routed experts' width to get the shared expert's
            (DeepSeek-V3's `n_shared_experts`: one MLP of `n_shared_experts x moe_intermediate_size`), which then has
            no width field of its own: a pruned shared width must be a multiple of the pruned expert width, and the
            count is rewritten.
        mamba (`str`, *optional*):
            A Mamba2 mixer inside a decoder layer (`in_proj` with output rows `[z, x, B, C, dt]`, a depthwise
            `conv1d` over `[x, B, C]`, per-head `A_log` / `D` / `dt_bias`, a gated group norm `norm` and `out_proj`).
        mamba_num_heads_field, mamba_head_dim_field, mamba_groups_field, mamba_state_field (`str`):
            The config fields of the Mamba2 heads, their channels, the B/C groups and the state size (Nemotron-H:
            `mamba_num_heads`, `mamba_head_dim`, `n_groups`, `ssm_state_size`; Bamba and Falcon-H1: `mamba_n_heads`,
            `mamba_d_head`, `mamba_n_groups`, `mamba_d_state`). `PrunedConfig` names the first two the same for
            every family.
        mamba_inner_field (`str`, *optional*):
            A config field giving the mixers' width `heads x head_dim` outright (Falcon-H1's `mamba_d_ssm`): written
            after pruning, so the width no longer follows the hidden size.
        mamba_expand_field (`str`, *optional*):
            The integer config field by which the modeling code multiplies the hidden size to get the mixers' width
            (Bamba's `mamba_expand`; the config checks `heads x head_dim == mamba_expand x hidden_size`): a pruned
            `heads x head_dim` must then be a multiple of the pruned hidden size.
        mamba_projection_buffers (`tuple[str, ...]`):
            Buffers of the mixer laid out like the output rows of `in_proj` (Falcon-H1's muP `mup_vector`, `[1, 1,
            rows]`, rebuilt from the config at load): sliced with those rows so the pruned model in memory computes
            what its reload will.
        short_conv (`str`, *optional*):
            A gated short-convolution operator inside a decoder layer (LFM2's `conv`: `in_proj` with output rows `[B,
            C, x]`, each `hidden_size` wide, a depthwise `conv` and `out_proj`): its channels are as many as the hidden
            size's, and pruned with it (`short_conv_channels.py`).
        mlp_auto_adjust_field (`str`, *optional*):
            A config flag by which the modeling code rescales `intermediate_size` when it builds the MLP (LFM2's
            `block_auto_adjust_ff_dim`: 2/3 of it, times `block_ffn_dim_multiplier`, rounded up to a multiple of
            `block_multiple_of`): the MLP width is read as built, and the flag is written `False` with the pruned
            width, so that the saved `intermediate_size` is the width a reload builds.
        layer_returns_tuple (`bool`):
            The decoder layers return a tuple `(hidden_states, ...)` rather than the hidden states (Bamba: `(hidden
            states, attention weights)`, unpacked as two; Falcon-H1: `(hidden_states,)`, read as `[0]`): a layer
            skipped while scoring depth then returns `(hidden_states, None)`.
        final_norm (`str`):
            The norm after the last decoder layer, inside the base model (`norm`; Nemotron-H: `norm_f`).
        block_type_attribute (`str`, *optional*):
            For hybrid families whose decoder layers hold different blocks (Nemotron-H, Bamba), the attribute of a
            decoder layer naming its block type; `None` when every layer holds every block of the spec (Falcon-H1,
            whose layers run attention and Mamba side by side), or, with `block_types`, when a layer's block type is
            told by which of their modules it holds (LFM2's layers hold `self_attn` or `conv`).
        block_types_field (`str`, *optional*):
            The config list giving each layer's block type (Nemotron-H: `layers_block_type`).
        block_types (`tuple[tuple[str, str | bool], ...]`):
            `(block, block type)` pairs: which block type holds each of the spec's blocks (`"attention"`, `"mlp"`,
            `"moe"`, `"mamba"`, `"short_conv"`), e.g. `("mamba", "linear_attention")`. A block type whose block the spec has no
            module for (`None`) is refused with a clear error. A block not named here is in every layer (Bamba's
            MLP follows the Mamba mixer or the attention of each layer). A block type is a value of
            `block_type_attribute`: a string, or Llama 4's `is_moe_layer` (`True` / `False`).
        expert_layout (`ParallelExperts`, *optional*):
            The experts of `moe` in the ScatterMoE layout (JetMoE); `None`: a transformers 5 experts module at
            `experts` routed by `router`.
        attention_experts (`str`, *optional*):
            A mixture of attention experts inside `attention` (JetMoE's MoA): routed experts, each a query projection
            (`first`) and an output projection (`second`) over `num_key_value_heads` heads, in the
            `attention_expert_layout`, around one shared `kv_proj`. Each token's query heads are those of its top-k
            experts (`num_attention_heads = num_key_value_heads x num_experts_per_tok`); its experts are as many as
            the MoE block's (`num_experts_field`), each block keeping its own.
        attention_expert_layout (`ParallelExperts`):
            Where the attention experts' projections, gating, router and output bias live.
        kv_proj (`str`):
            The shared key/value projection of a mixture of attention experts: output rows `[k (kv_heads x
            head_dim), v (kv_heads x head_dim)]`.
        kv_b_proj (`str`, *optional*):
            Multi-head latent attention (DeepSeek-V2/V3's MLA) when set: the up-projection of the key/value latent,
            output rows `[heads, qk_nope_head_dim + v_head_dim]`. Its heads are `latent_attention_heads.py`'s.
        q_a_proj, q_b_proj, kv_a_proj (`str`):
            MLA's query down- and up-projections (`q_b_proj` rows `[heads, qk_nope_head_dim + qk_rope_head_dim]`;
            `q_proj` instead when the config's `q_lora_rank` is `None`) and the key/value down-projection, whose
            output is the latent and the one rotary key shared by every head (`[kv_lora_rank + qk_rope_head_dim]`).
        dense_layers_field (`str`, *optional*):
            The config field counting the leading decoder layers whose feed-forward block is a dense MLP, the later
            ones holding the MoE block at the same path (DeepSeek-V3's `first_k_dense_replace`): their block type
            ("mlp" or "moe") is read from the module, and depth pruning rewrites the count.
        attention_output_gate (`bool`):
            The query projection also produces a per-head output gate (Qwen3-Next and Qwen3.5's gated attention):
            its rows are `[query (head_dim), gate (head_dim)]` for each head in turn, and `o_proj` reads the
            attention output times `sigmoid(gate)`. Pruning a head removes both halves of its rows.
        deltanet (`str`, *optional*):
            A Gated DeltaNet mixer inside a decoder layer (Qwen3-Next, Qwen3.5's `linear_attn`): `linear_num_key_heads`
            query/key heads, each read by `linear_num_value_heads / linear_num_key_heads` consecutive value heads; a
            depthwise `conv1d` over `[q, k, v]`, per-value-head `A_log` / `dt_bias`, a gated norm over one value head
            (`norm`) and `out_proj`.
        deltanet_fused (`bool`):
            The mixer's input projections are fused and laid out per key head (Qwen3-Next): `in_proj_qkvz` with rows
            `[q (dk), k (dk), v (its value heads x dv), z (same)]` for each key head in turn, `in_proj_ba` with rows
            `[b (its value heads), a (same)]` for each key head. `False`: separate `in_proj_qkv` (rows `[q (all key
            heads), k (same), v (all value heads)]`), `in_proj_z`, `in_proj_b` and `in_proj_a` (Qwen3.5).
        expert_score_bias (`str`, *optional*):
            A `[experts]` buffer of the MoE block itself (not of its router) added to the sigmoid router scores to
            choose the experts (MiniMax-M2's `e_score_correction_bias`, passed to the router by the block): sliced
            with the experts. A router's own `e_score_correction_bias` (Nemotron-H) needs no field.
        experts_scale_input (`bool`):
            The MoE block multiplies each token by its router score *before* the experts and runs every expert on
            every token (Llama 4's `Llama4TextMoe`: the experts module gets `[experts x tokens, hidden]` and no
            routing; `gate_up_proj` `[E, H, 2I]`, `down_proj` `[E, I, H]`, no biases; the router, a `Linear`, returns
            `(scores, logits)`). An expert's output for a token not routed to it is then zero.
        moe_layers_field (`str`, *optional*):
            A config list of the indices of the layers that hold the MoE block (Llama 4's `moe_layers`, from
            `interleave_moe_layer_step`), the others holding the dense MLP, at the same path (`block_type_attribute`
            tells them apart in a model, this list in a config: `depth.layer_block_types`); depth pruning renumbers
            it, and `num_layers_by_type` counts `"moe"` and `"mlp"` layers as a hybrid's.
        mlp_width_field (`str`):
            The config field of the dense MLP's width, which `PrunedConfig.intermediate_size` targets (Llama 4:
            `intermediate_size_mlp`, its `intermediate_size` being the experts' width).
        mlp_width_per_layer (`bool`):
            The stock modelling reads `mlp_width_field` as a list, one width per layer (Gemma 3n's `intermediate_size`,
            read as `config.intermediate_size[layer_idx]`): only then may the MLP widths differ by layer
            (`PrunedConfig.intermediate_size_per_layer`, `mlp_width_allocation="global"`), since a model of another
            family with different widths would not reload.
        token_tables (`tuple[str, ...]`):
            Other token-indexed tables of the base model, counted as embeddings (out of `count_parameters`'s
            `"non_embedding"`): Gemma 3n's per-layer input embeddings (`embed_tokens_per_layer`,
            `vocab_size_per_layer_input x (num_hidden_layers x hidden_size_per_layer_input)`), which its "effective"
            sizes (E2B, E4B) leave out.
        per_layer_tables (`tuple[tuple[str, int], ...]`):
            `(base-model module, weight dim)` pairs whose weight holds one block of `per_layer_table_width` per layer
            along that dim (Gemma 3n's `embed_tokens_per_layer`, dim 1, and `per_layer_model_projection`, dim 0, of
            `num_hidden_layers x hidden_size_per_layer_input`): depth pruning keeps the kept layers' blocks.
        per_layer_table_width (`str | None`):
            The config field of one layer's block in `per_layer_tables` (`hidden_size_per_layer_input`).
        kv_shared_layers_field (`str | None`):
            The config field counting the last layers that compute no keys and values and read those of the last
            earlier layer of their `layer_types` entry (Gemma 3n's `num_kv_shared_layers`): depth pruning keeps those
            producer layers and counts the shared layers it keeps.
        hidden_modules (`tuple[tuple[str, str], ...]`):
            Further weights over the hidden size, besides the residual norms, the final norm, the embedding and what
            each structure slices itself: `(path, role)`, the path from the base model with `*` for every entry of a
            module list (`layers.*.laurel.linear_left`), the role `"in"` (a linear reading the hidden channels),
            `"out"` (one writing them), `"both"`, `"norm"` (a norm over them) or `"vector"` (a parameter over them).
            Hidden-size pruning slices them all with the same channels (Gemma 3n's AltUp, LAuReL, per-layer inputs).
        hidden_scaled_inputs (`tuple[tuple[str, str, float], ...]`):
            `(buffer path, linear path, power)`: the modelling multiplies the linear's input by the buffer,
            `hidden_size ** power`, set from the config at construction (Gemma 3n's AltUp router, `hidden_size**-1`,
            and per-layer projection, `hidden_size**-0.5`). Hidden-size pruning sets the buffer as a reload will
            and rescales the linear's weight by `(old / new) ** power`, so each kept channel adds what it did.

    The structures a family has follow from the spec: `attention` (`None`: no attention) holds heads (or, with
    `attention_experts`, attention experts and their KV heads), `mlp` (`None`: no dense MLP, e.g. Mixtral whose
    feed-forward blocks are all experts) holds MLP neurons, `short_conv` short-conv channels.
    """

    q_proj: str | None = "q_proj"
    k_proj: str | None = "k_proj"
    v_proj: str | None = "v_proj"
    qkv_proj: str | None = None
    o_proj: str = "o_proj"
    gate_proj: str | None = "gate_proj"
    up_proj: str | None = "up_proj"
    gate_up_proj: str | None = None
    down_proj: str = "down_proj"
    attention: str | None = "self_attn"
    mlp: str | None = "mlp"
    attn_input_norm: str | None = "input_layernorm"
    mlp_input_norm: str | None = "post_attention_layernorm"
    residual_norms: tuple[str, ...] = ("input_layernorm", "post_attention_layernorm")
    embedding_scale_sqrt_hidden: bool = False
    attention_head_parameters: tuple[str, ...] = ()
    qk_norm_over_heads: bool = False
    head_dim_from_hidden: bool = False
    moe: str | None = None
    router: str = "gate"
    experts: str = "experts"
    shared_expert: str | None = None
    shared_expert_gate: str | None = None
    shared_expert_in_layer: bool = False
    num_experts_field: str = "num_experts"
    expert_width_field: str = "moe_intermediate_size"
    shared_expert_width_field: str = "shared_expert_intermediate_size"
    shared_expert_count_field: str | None = None
    mamba: str | None = None
    mamba_num_heads_field: str = "mamba_num_heads"
    mamba_head_dim_field: str = "mamba_head_dim"
    mamba_groups_field: str = "n_groups"
    mamba_state_field: str = "ssm_state_size"
    mamba_inner_field: str | None = None
    mamba_expand_field: str | None = None
    mamba_projection_buffers: tuple[str, ...] = ()
    short_conv: str | None = None
    mlp_auto_adjust_field: str | None = None
    layer_returns_tuple: bool = False
    final_norm: str = "norm"
    block_type_attribute: str | None = None
    block_types_field: str | None = None
    block_types: tuple[tuple[str, str | bool], ...] = ()
    expert_layout: ParallelExperts | None = None
    attention_experts: str | None = None
    attention_expert_layout: ParallelExperts = ParallelExperts(gated=False)
    kv_proj: str = "kv_proj"
    kv_b_proj: str | None = None
    q_a_proj: str = "q_a_proj"
    q_b_proj: str = "q_b_proj"
    kv_a_proj: str = "kv_a_proj_with_mqa"
    dense_layers_field: str | None = None
    attention_output_gate: bool = False
    deltanet: str | None = None
    deltanet_fused: bool = False
    expert_score_bias: str | None = None
    experts_scale_input: bool = False
    moe_layers_field: str | None = None
    mlp_width_field: str = "intermediate_size"
    mlp_width_per_layer: bool = False
    token_tables: tuple[str, ...] = ()
    per_layer_tables: tuple[tuple[str, int], ...] = ()
    per_layer_table_width: str | None = None
    kv_shared_layers_field: str | None = None
    hidden_modules: tuple[tuple[str, str], ...] = ()
    hidden_scaled_inputs: tuple[tuple[str, str, float], ...] = ()
    # q_norm/k_norm (Qwen3) act over head_dim, which pruning never changes: they need no slicing.
    notes: str = field(default="", compare=False)

    def has(self, layer, block: str | None) -> bool:
        """Whether decoder `layer` holds `block` (`"attention"`, `"mlp"`, `"moe"`, `"mamba"`; `None`: the layer
        itself). In a family whose layers are alike, every layer holds all of the family's blocks; in a hybrid, a
        layer holds the block its block type names, and every block that `block_types` does not name."""
        if self.dense_layers_field is not None and block in ("mlp", "moe"):
            return self.block_type_of(layer) == block
        kinds = dict(self.block_types)
        if block is None or block not in kinds:
            return True
        return self.block_type_of(layer) in (kinds[block], None)

    def block_type_of(self, layer):
        """The block type of decoder `layer` in a family whose layers differ (`None` when they are alike): a hybrid's
        `block_type_attribute` (a `block_types_field` entry; Llama 4's `is_moe_layer`), with `dense_layers_field`
        whether the feed-forward block holds routed experts, else the block module the layer holds (LFM2)."""
        if self.block_type_attribute is not None:
            return getattr(layer, self.block_type_attribute)
        if self.dense_layers_field is not None:
            return "moe" if hasattr(layer.get_submodule(self.moe), self.experts) else "mlp"
        for block, kind in self.block_types:  # told by the block module the layer holds
            if getattr(layer, getattr(self, block), None) is not None:
                return kind
        return None

    def layer_block_types(self, config) -> list | None:
        """Each layer's block type from `config` alone, as `block_type_of` reads it from a model (`None` when the
        layers are alike)."""
        if self.moe_layers_field is not None:
            moe = set(getattr(config, self.moe_layers_field))
            return [i in moe for i in range(config.num_hidden_layers)]
        if self.block_types_field is not None:
            return list(getattr(config, self.block_types_field))
        if self.dense_layers_field is not None:
            dense = min(getattr(config, self.dense_layers_field) or 0, config.num_hidden_layers)
            return ["mlp"] * dense + ["moe"] * (config.num_hidden_layers - dense)
        return None


@dataclass(frozen=True)
class BlockType:
    """A kind of block a hybrid's decoder layer may hold, named as `PrunedConfig.num_layers_by_type` names it.

    Args:
        name (`str`): the block's name, also the `ArchitectureSpec` field of its module path.
        role (`str`): `"mixer"` (a sequence mixer, fed by the layer's first norm) or `"ffn"` (fed by the second).
        column (`str`): its layers' column in the search report; capitalised, its model-card row.
        short (`str`): the prefix of its layer count in a candidate's name.
    """

    name: str
    role: str
    column: str
    short: str


# The block types, in the order of the card rows and search axes. A new kind of sequence mixer or feed-forward block
# is one entry here (and the spec field of its module path); depth, hidden channels and the summary read this table.
BLOCK_TYPES = (
    BlockType("mamba", "mixer", "Mamba layers", "mambalayers"),
    BlockType("attention", "mixer", "attention layers", "attnlayers"),
    BlockType("mlp", "ffn", "MLP layers", "mlplayers"),
    BlockType("moe", "ffn", "MoE layers", "moelayers"),
    BlockType("deltanet", "mixer", "Gated DeltaNet layers", "dnlayers"),
    BlockType("short_conv", "mixer", "short-conv layers", "convlayers"),
)


_LLAMA_LIKE = ArchitectureSpec()

# Bamba and Falcon-H1 share transformers' Mamba2 layer layout (the mixer `mamba`, the MLP `feed_forward` after
# `pre_ff_layernorm`, `final_layernorm`, layers that return tuples) and the names of the mixer's config fields.
_MAMBA2_LAYER = dict(
    mamba="mamba",
    mlp="feed_forward",
    mlp_input_norm="pre_ff_layernorm",
    residual_norms=("input_layernorm", "pre_ff_layernorm"),
    final_norm="final_layernorm",
    mamba_num_heads_field="mamba_n_heads",
    mamba_head_dim_field="mamba_d_head",
    mamba_groups_field="mamba_n_groups",
    mamba_state_field="mamba_d_state",
    layer_returns_tuple=True,
)

# Qwen3-Next and Qwen3.5 share the layout of their Gated DeltaNet / gated-attention layers (`block_type` from
# `layer_types`) and their mixers' config fields (`linear_num_key_heads`, ...).
_GATED_DELTANET_LAYER = dict(
    deltanet="linear_attn",
    attention_output_gate=True,
    block_type_attribute="block_type",
    block_types_field="layer_types",
    block_types=(("attention", "full_attention"), ("deltanet", "linear_attention")),
)


ARCHITECTURES: dict[str, ArchitectureSpec] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": ArchitectureSpec(notes="q/k/v biases are sliced with their rows"),
    "qwen3": ArchitectureSpec(notes="q_norm/k_norm act over head_dim and are kept as they are"),
    "gemma": ArchitectureSpec(
        embedding_scale_sqrt_hidden=True, notes="tied embeddings; embeddings are scaled by sqrt(hidden_size)"
    ),
    "gemma2": ArchitectureSpec(
        mlp_input_norm="pre_feedforward_layernorm",
        embedding_scale_sqrt_hidden=True,
        residual_norms=(
            "input_layernorm",
            "post_attention_layernorm",
            "pre_feedforward_layernorm",
            "post_feedforward_layernorm",
        ),
        notes="sandwich norms; per-layer layer_types (sliding/full attention)",
    ),
    "nemotron": ArchitectureSpec(gate_proj=None, notes="LayerNorm1P with bias; squared-ReLU MLP without a gate"),
    "phi3": ArchitectureSpec(
        q_proj=None,
        k_proj=None,
        v_proj=None,
        qkv_proj="qkv_proj",
        gate_proj=None,
        up_proj=None,
        gate_up_proj="gate_up_proj",
        notes="fused qkv_proj and gate_up_proj",
    ),
    # Dense families of 2025-2026.
    "gemma3_text": ArchitectureSpec(
        mlp_input_norm="pre_feedforward_layernorm",
        embedding_scale_sqrt_hidden=True,
        residual_norms=(
            "input_layernorm",
            "post_attention_layernorm",
            "pre_feedforward_layernorm",
            "post_feedforward_layernorm",
        ),
        notes="Gemma 3 text: sandwich norms, q/k norms over head_dim, head_dim independent of hidden, sliding/full",
    ),
    "smollm3": ArchitectureSpec(notes="no_rope_layers is per layer: depth pruning slices it with the layers"),
    "olmo2": ArchitectureSpec(
        attn_input_norm=None,
        mlp_input_norm=None,
        residual_norms=("post_attention_layernorm", "post_feedforward_layernorm"),
        qk_norm_over_heads=True,
        notes="post-norm blocks; q_norm/k_norm over all heads x head_dim, sliced with the heads",
    ),
    "olmo3": ArchitectureSpec(
        attn_input_norm=None,
        mlp_input_norm=None,
        residual_norms=("post_attention_layernorm", "post_feedforward_layernorm"),
        qk_norm_over_heads=True,
        notes="as OLMo 2, with sliding/full layer_types",
    ),
    "exaone4": ArchitectureSpec(
        attn_input_norm=None,
        mlp_input_norm=None,
        residual_norms=("post_attention_layernorm", "post_feedforward_layernorm"),
        notes="post-norm blocks; q_norm/k_norm over head_dim",
    ),
    "granite": ArchitectureSpec(
        notes="embedding/residual/attention multipliers and logits scaling kept in the config"
    ),
    "glm4": ArchitectureSpec(
        gate_proj=None,
        up_proj=None,
        gate_up_proj="gate_up_proj",
        residual_norms=(
            "input_layernorm",
            "post_attention_layernorm",
            "post_self_attn_layernorm",
            "post_mlp_layernorm",
        ),
        notes="fused gate_up_proj; four norms per layer; q/k/v biases",
    ),
    "cohere2": ArchitectureSpec(
        mlp_input_norm="input_layernorm",
        residual_norms=("input_layernorm",),
        notes="parallel attention and MLP reading one input_layernorm; logit_scale kept",
    ),
    "apertus": ArchitectureSpec(
        gate_proj=None,
        attn_input_norm="attention_layernorm",
        mlp_input_norm="feedforward_layernorm",
        residual_norms=("attention_layernorm", "feedforward_layernorm"),
        notes="non-gated xIELU MLP; q/k norms over head_dim",
    ),
    "arcee": ArchitectureSpec(gate_proj=None, notes="non-gated ReLU^2 MLP"),
    # Mixture-of-Experts families: every decoder layer's feed-forward block is a sparse MoE block.
    "mixtral": ArchitectureSpec(
        mlp=None,
        moe="mlp",
        num_experts_field="num_local_experts",
        expert_width_field="intermediate_size",
        notes="routed experts only; the experts' width is the config's intermediate_size",
    ),
    "qwen2_moe": ArchitectureSpec(
        mlp=None,
        moe="mlp",
        shared_expert="shared_expert",
        shared_expert_gate="shared_expert_gate",
        notes="routed experts + a gated shared expert; q/k/v biases; every layer sparse (decoder_sparse_step=1)",
    ),
    "qwen3_moe": ArchitectureSpec(mlp=None, moe="mlp", notes="q_norm/k_norm act over head_dim and are kept"),
    "olmoe": ArchitectureSpec(
        mlp=None,
        moe="mlp",
        expert_width_field="intermediate_size",
        qk_norm_over_heads=True,
        head_dim_from_hidden=True,
        notes="q_norm/k_norm over all heads; head_dim = hidden_size // num_attention_heads",
    ),
    "gpt_oss": ArchitectureSpec(
        mlp=None,
        moe="mlp",
        router="router",
        num_experts_field="num_local_experts",
        expert_width_field="intermediate_size",
        attention_head_parameters=("sinks",),
        notes="expert and router biases, interleaved gate/up, attention sinks per head, sliding/full layer_types",
    ),
    "jetmoe": ArchitectureSpec(
        attention="self_attention",
        mlp=None,
        moe="mlp",
        expert_layout=ParallelExperts(),
        attention_experts="experts",
        num_experts_field="num_local_experts",
        expert_width_field="intermediate_size",
        notes="mixture of attention experts (per-expert query/output projections, shared kv_proj, query heads = "
        "kv heads x top-k) and MoE experts, one expert count for both; ScatterMoE [E, out, in] weights; tied embeddings",
    ),
    "minimax_m2": ArchitectureSpec(
        mlp=None,
        moe="mlp",
        num_experts_field="num_local_experts",
        expert_width_field="intermediate_size",
        expert_score_bias="e_score_correction_bias",
        qk_norm_over_heads=True,
        notes="sigmoid router with the block's e_score_correction_bias (sliced with the experts); q_norm/k_norm over "
        "all heads x head_dim, sliced with the heads; partial rotary",
    ),
    "llama4_text": ArchitectureSpec(
        mlp="feed_forward",
        mlp_width_field="intermediate_size_mlp",
        moe="feed_forward",
        router="router",
        shared_expert="shared_expert",
        num_experts_field="num_local_experts",
        expert_width_field="intermediate_size",
        # The shared expert is built with the routed experts' width: one config field for both.
        shared_expert_width_field="intermediate_size",
        experts_scale_input=True,
        # Each layer holds an MoE block or a dense MLP (of width intermediate_size_mlp) at `feed_forward`.
        moe_layers_field="moe_layers",
        block_type_attribute="is_moe_layer",
        block_types=(("moe", True), ("mlp", False)),
        notes="top-1 sigmoid router whose score scales the experts' input; a shared expert as wide as the routed "
        "ones (one intermediate_size: pruned to the same width); MoE and dense layers interleaved (moe_layers), the "
        "dense MLPs' width intermediate_size_mlp; no-RoPE layers, weightless q/k norm, chunked attention",
    ),
    # DeepSeek-V3: multi-head latent attention, then a dense MLP in the first `first_k_dense_replace` layers and an
    # MoE block (grouped sigmoid router, one shared MLP) at the same path in the others.
    "deepseek_v3": ArchitectureSpec(
        k_proj=None,
        v_proj=None,
        kv_b_proj="kv_b_proj",
        moe="mlp",
        shared_expert="shared_experts",
        num_experts_field="n_routed_experts",
        shared_expert_count_field="n_shared_experts",
        dense_layers_field="first_k_dense_replace",
        notes="MLA heads (q_b_proj / kv_b_proj rows, o_proj columns) and latent ranks; dense MLP layers then MoE layers "
        "(first_k_dense_replace); sigmoid router with e_score_correction_bias and grouped top-k (experts kept per "
        "group); the shared MLP is n_shared_experts x moe_intermediate_size wide",
    ),
    # GLM-4.5 (GLM-4-MoE): DeepSeek-V3's MoE side with grouped-query attention.
    "glm4_moe": ArchitectureSpec(
        moe="mlp",
        shared_expert="shared_experts",
        num_experts_field="n_routed_experts",
        shared_expert_count_field="n_shared_experts",
        dense_layers_field="first_k_dense_replace",
        notes="dense MLP layers then MoE layers (first_k_dense_replace); sigmoid router with e_score_correction_bias "
        "and grouped top-k; the shared MLP is n_shared_experts x moe_intermediate_size wide; q/k/v biases, optional "
        "q/k norms over head_dim, partial rotary",
    ),
    # Hybrid Mamba2-attention families: each decoder layer holds ONE block (its `mixer`) after one pre-norm.
    "nemotron_h": ArchitectureSpec(
        attention="mixer",
        mlp="mixer",
        mamba="mixer",
        moe="mixer",
        shared_expert="shared_experts",
        num_experts_field="n_routed_experts",
        shared_expert_width_field="moe_shared_expert_intermediate_size",
        gate_proj=None,
        attn_input_norm="norm",
        mlp_input_norm="norm",
        residual_norms=("norm",),
        final_norm="norm_f",
        block_type_attribute="block_type",
        block_types_field="layers_block_type",
        block_types=(("attention", "full_attention"), ("mlp", "mlp"), ("mamba", "linear_attention"), ("moe", "moe")),
        notes="hybrid: per-layer mamba / attention / mlp / moe blocks (layers_block_type); non-gated ReLU^2 MLP and "
        "experts; MoE: sigmoid router with e_score_correction_bias and grouped top-k (n_group / topk_group, experts "
        "kept per group), an ungated shared expert",
    ),
    # Bamba: each layer holds a Mamba2 mixer OR attention (layers_block_type, derived from attn_layer_indices), then a
    # gated MLP in every layer.
    "bamba": ArchitectureSpec(
        **_MAMBA2_LAYER,
        block_type_attribute="block_type",
        block_types_field="layers_block_type",
        block_types=(("attention", "full_attention"), ("mamba", "linear_attention")),
        mamba_expand_field="mamba_expand",
        notes="hybrid: mamba or attention per layer (attn_layer_indices), a SwiGLU MLP in every layer; the Mamba width "
        "is mamba_expand x hidden_size, so heads x head_dim stays a multiple of the hidden size",
    ),
    # Falcon-H1: attention and a Mamba2 mixer side by side in EVERY layer (their outputs summed), then a gated MLP;
    # the muP multipliers are scalars or per-section constants, unchanged by pruning.
    "falcon_h1": ArchitectureSpec(
        **_MAMBA2_LAYER,
        mamba_inner_field="mamba_d_ssm",
        mamba_projection_buffers=("mup_vector",),
        notes="parallel attention + Mamba2 in every layer, then a SwiGLU MLP; muP multipliers kept; mamba_d_ssm "
        "written; the mixers' mup_vector sliced with in_proj's rows",
    ),
    # Gated DeltaNet hybrids: each layer holds a Gated DeltaNet mixer (`linear_attn`) OR gated attention
    # (`layer_types`), then its feed-forward block; zero-centred RMSNorms `(1 + weight)`, q/k norms over head_dim.
    "qwen3_next": ArchitectureSpec(
        **_GATED_DELTANET_LAYER,
        mlp=None,
        moe="mlp",
        shared_expert="shared_expert",
        shared_expert_gate="shared_expert_gate",
        deltanet_fused=True,
        notes="hybrid: Gated DeltaNet (in_proj_qkvz / in_proj_ba laid out per key head) or gated attention (q_proj "
        "rows [query; gate] per head) per layer, then routed experts + a gated shared expert in every layer "
        "(decoder_sparse_step=1, no mlp_only_layers)",
    ),
    "qwen3_5_text": ArchitectureSpec(
        **_GATED_DELTANET_LAYER,
        notes="Qwen3.5's text model: Gated DeltaNet (separate in_proj_qkv / z / b / a) or gated attention per layer, "
        "then a SwiGLU MLP",
    ),
    "qwen3_5_moe_text": ArchitectureSpec(
        **_GATED_DELTANET_LAYER,
        mlp=None,
        moe="mlp",
        shared_expert="shared_expert",
        shared_expert_gate="shared_expert_gate",
        notes="Qwen3.5-MoE's text model: Qwen3.5's layers with routed experts + a gated shared expert in every layer; "
        "its config has no intermediate_size",
    ),
    # Granite 4 (hybrid): each layer holds a Mamba2 mixer (Bamba's) OR attention, then an MoE block (a transformers 5
    # experts module) plus an always-active gated MLP beside it, its shared expert.
    "granitemoehybrid": ArchitectureSpec(
        mamba="mamba",
        mamba_num_heads_field="mamba_n_heads",
        mamba_head_dim_field="mamba_d_head",
        mamba_groups_field="mamba_n_groups",
        mamba_state_field="mamba_d_state",
        mamba_expand_field="mamba_expand",
        mlp=None,
        moe="block_sparse_moe",
        router="router",
        num_experts_field="num_local_experts",
        expert_width_field="intermediate_size",
        shared_expert="shared_mlp",
        shared_expert_in_layer=True,
        shared_expert_width_field="shared_intermediate_size",
        gate_proj=None,
        up_proj=None,
        gate_up_proj="input_linear",
        down_proj="output_linear",
        block_type_attribute="block_type",
        block_types_field="layer_types",
        block_types=(("attention", "full_attention"), ("mamba", "linear_attention")),
        notes="hybrid: mamba or attention per layer (layer_types), then routed experts plus a shared gated MLP "
        "(shared_mlp, fused input_linear) beside the MoE block in every layer; head_dim written to the config; the "
        "Mamba width is mamba_expand x hidden_size; embedding/residual/attention multipliers and logits scaling kept",
    ),
    # LFM2: each layer holds a gated short convolution OR attention (layer_types), then a SwiGLU MLP; the final norm is
    # `embedding_norm`.
    "lfm2": ArchitectureSpec(
        o_proj="out_proj",
        mlp="feed_forward",
        gate_proj="w1",
        up_proj="w3",
        down_proj="w2",
        short_conv="conv",
        attn_input_norm="operator_norm",
        mlp_input_norm="ffn_norm",
        residual_norms=("operator_norm", "ffn_norm"),
        final_norm="embedding_norm",
        mlp_auto_adjust_field="block_auto_adjust_ff_dim",
        block_types_field="layer_types",
        block_types=(("attention", "full_attention"), ("short_conv", "conv")),
        notes="hybrid: short-conv or attention per layer (layer_types; full_attn_idxs renumbered), a SwiGLU MLP (w1, w3, "
        "w2) in every layer; q/k layernorms over head_dim; head_dim written to the config; the saved "
        "intermediate_size is the built width (block_auto_adjust_ff_dim written False); the conv operators' channels, "
        "hidden_size of them, are scored and pruned to the pruned hidden size",
    ),
    # Gemma 3n's text model: Gemma 3's sandwich norms and q/k norms, with AltUp (the residual stream carried as
    # altup_num_inputs predictions), LAuReL (a low-rank residual beside attention), per-layer input embeddings, the last
    # num_kv_shared_layers layers reusing earlier layers' keys and values, and one MLP width per layer.
    "gemma3n_text": ArchitectureSpec(
        mlp_input_norm="pre_feedforward_layernorm",
        embedding_scale_sqrt_hidden=True,
        residual_norms=(
            "input_layernorm",
            "post_attention_layernorm",
            "pre_feedforward_layernorm",
            "post_feedforward_layernorm",
        ),
        mlp_width_per_layer=True,
        token_tables=("embed_tokens_per_layer",),
        per_layer_tables=(("embed_tokens_per_layer", 1), ("per_layer_model_projection", 0)),
        per_layer_table_width="hidden_size_per_layer_input",
        kv_shared_layers_field="num_kv_shared_layers",
        hidden_modules=(
            ("layers.*.altup.modality_router", "in"),
            ("layers.*.altup.router_norm", "norm"),
            ("layers.*.altup.correct_output_scale", "vector"),
            ("layers.*.laurel.linear_left", "in"),
            ("layers.*.laurel.linear_right", "out"),
            ("layers.*.laurel.post_laurel_norm", "norm"),
            ("layers.*.per_layer_input_gate", "in"),
            ("layers.*.per_layer_projection", "out"),
            ("layers.*.post_per_layer_input_norm", "norm"),
            ("altup_projections.*", "both"),
            ("altup_unembed_projections.*", "both"),
            ("per_layer_model_projection", "in"),
        ),
        hidden_scaled_inputs=(
            ("layers.*.altup.router_input_scale", "layers.*.altup.modality_router", -1.0),
            ("per_layer_projection_scale", "per_layer_model_projection", -0.5),
        ),
        notes="Gemma 3n text: MLP neurons per layer (intermediate_size is a list; activation_sparsity_pattern's layers "
        "cut at mean + k x std of the gate over the kept neurons), query and KV heads (a shared layer keeps the KV heads "
        "of the layer it reads), depth (the per-layer input tables sliced, the layers whose keys and values later "
        "layers read kept) and hidden size (AltUp, LAuReL and the per-layer-input weights sliced alike, the AltUp "
        "router and per-layer projection rescaled for their hidden_size-dependent input scales)",
    ),
}


def get_architecture(config, spec: ArchitectureSpec | None = None) -> ArchitectureSpec:
    """The spec of `config.model_type` in `ARCHITECTURES`, or `spec` when the caller passes one in.

    A family the table does not hold, typically a checkpoint that ships its own modelling code (loaded with
    `trust_remote_code=True`), is described by the caller with an `ArchitectureSpec` of its own, passed to
    `prune_model`, `estimate_importance`, `magnitude_importance`, `random_importance` and `count_parameters` as
    `spec=`; nothing is registered. Such a spec describes a dense family (attention and an MLP in every layer) whose
    config uses the usual field names (`hidden_size`, `intermediate_size`, `num_attention_heads`, ...): the sizes of
    MoE, Mamba and hybrid families are read through their table entry. Raises a `ValueError` listing the supported
    families otherwise.
    """
    model_type = getattr(config, "model_type", None)
    if spec is not None:
        if not isinstance(spec, ArchitectureSpec):
            raise TypeError(f"spec must be an ArchitectureSpec, got {type(spec).__name__}.")
        extras = [
            name
            for name in ("moe", "mamba", "deltanet", "attention_experts", "block_types_field")
            if getattr(spec, name)
        ]
        if extras and spec != ARCHITECTURES.get(model_type):  # the table's own entry, passed on, is fine
            raise ValueError(
                f"The spec passed in for model_type={model_type!r} sets {', '.join(extras)}: "
                "a spec passed in describes a dense family (attention and an MLP in every layer). MoE, Mamba and "
                "hybrid families need an entry in `hf_minitron/architectures.py`."
            )
        return spec
    if model_type not in ARCHITECTURES:
        raise ValueError(
            f"Unsupported architecture: model_type={model_type!r}. hf-minitron supports "
            f"{', '.join(sorted(ARCHITECTURES))}. For another dense family (e.g. one with its own modelling code, "
            "loaded with trust_remote_code=True), describe where its modules live with an `ArchitectureSpec` and "
            'pass it: `prune_model(model, config, data, spec=ArchitectureSpec(...))` (README, "Custom families").'
        )
    spec = ARCHITECTURES[model_type]
    check_no_per_layer_config(config)
    if spec.block_types_field is not None:
        check_block_types(spec, config)
    if spec.moe is not None and spec.mlp is None:
        check_sparse_layers(config)
    return spec


def check_sparse_layers(config) -> None:
    """Refuses a MoE family whose config makes some layers dense (Qwen-MoE's and Qwen3-Next's `mlp_only_layers` and
    `decoder_sparse_step`): its spec holds the MoE block at the path where those layers hold a dense MLP."""
    dense = list(getattr(config, "mlp_only_layers", None) or [])
    step = getattr(config, "decoder_sparse_step", 1)
    if step != 1:
        dense = sorted(set(dense) | {i for i in range(config.num_hidden_layers) if (i + 1) % step})
    if dense:
        raise ValueError(
            f"model_type={config.model_type!r} with dense MLP layers {dense} (mlp_only_layers="
            f"{getattr(config, 'mlp_only_layers', None)}, decoder_sparse_step={step}) is not supported: hf-minitron "
            "prunes this family with a MoE block in every layer. Use a model with mlp_only_layers=[] and "
            "decoder_sparse_step=1."
        )


def check_block_types(spec: ArchitectureSpec, config) -> None:
    """Refuses a hybrid model with a block type the spec has no structures for, without its MoE blocks (zero experts),
    or with MoE blocks whose experts work in a latent space (`moe_latent_size`, LatentMoE), which the expert
    structures do not slice."""
    supported = {kind: block for block, kind in spec.block_types if getattr(spec, block) is not None}
    kinds = list(getattr(config, spec.block_types_field))
    unsupported = sorted({kind for kind in kinds if kind not in supported})
    if unsupported:
        layers = [i for i, kind in enumerate(kinds) if kind in unsupported]
        raise ValueError(
            f"model_type={config.model_type!r} with {spec.block_types_field} {unsupported} (layers {layers}) is not "
            f"supported: hf-minitron prunes its {', '.join(repr(k) for k in supported)} blocks. Use a model without "
            f"{' / '.join(unsupported)} blocks."
        )
    if spec.moe is not None and getattr(config, spec.num_experts_field, None) == 0:
        # Granite 4 builds no MoE block with zero experts (its dense variants): the expert structures would hook and
        # count a module that is not there.
        raise ValueError(
            f"model_type={config.model_type!r} with {spec.num_experts_field}=0 (no MoE block) is not supported: "
            f"hf-minitron prunes the MoE families with their routed experts. Use a model with {spec.num_experts_field} "
            "> 0."
        )
    latent = getattr(config, "moe_latent_size", None)
    if latent is not None and dict(spec.block_types).get("moe") in kinds:
        # The experts read and write moe_latent_size channels through fc1/fc2_latent_proj: hidden pruning would have
        # to slice those projections instead of the experts, and the parameter count would need a latent axis.
        raise ValueError(
            f"model_type={config.model_type!r} with moe_latent_size={latent} (latent MoE: experts behind latent "
            "projections) is not supported: hf-minitron prunes MoE blocks whose experts read the hidden size. Use a "
            "model with moe_latent_size=None."
        )


def check_no_per_layer_config(config) -> None:
    """Refuses transformers' per-layer overrides (`per_layer_config`): no supported family's stock modelling reads them
    (transformers 5.25 reads them for none of our families), so such a config builds no model (its per-layer fields
    raise when read) and a pruned one would not reload."""
    if not getattr(config, "is_heterogeneous", False):
        return
    overrides = config.__dict__["_heterogeneity_spec"].per_layer_overrides
    raise ValueError(
        f"This {config.model_type} config sets per_layer_config (per-layer overrides {overrides}), which the stock "
        f"{config.model_type} modelling does not read: transformers cannot build or reload such a model, so "
        "hf-minitron does not prune or count it. Drop per_layer_config; per-layer MLP widths are supported where the "
        "modelling reads them (Gemma 3n's list-valued intermediate_size: PrunedConfig.intermediate_size_per_layer)."
    )


def model_shape(config) -> dict:
    """The prunable sizes of `config`, under `PrunedConfig`'s names: each structure's `shape` (MoE sizes for MoE
    families, Mamba sizes for hybrids), read from the family's own config fields where its spec names them."""
    from .pruning.structures import STRUCTURES  # they import this module

    check_no_per_layer_config(config)
    spec = ARCHITECTURES.get(config.model_type)
    shape = {"model_type": config.model_type}
    for structure in STRUCTURES:
        shape |= structure.shape(config, spec)
    return shape


def check_causal_lm(model, where: str) -> None:
    """Raises a clear error for what `where` cannot work on: a path instead of a model, a base model without its LM
    head, a model whose weights are all on the `meta` device (built under `init_empty_weights`, never loaded)."""
    from transformers import PreTrainedModel

    if isinstance(model, (str, bytes)) or hasattr(model, "__fspath__"):
        raise TypeError(
            f"{where} takes a loaded model, got the path {str(model)!r}: load it first with "
            "AutoModelForCausalLM.from_pretrained(path), or use the command line (`hf-minitron prune --teacher PATH`)."
        )
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"{where} takes a transformers `*ForCausalLM` model, got {type(model).__name__}.")
    if model.get_output_embeddings() is None:
        raise TypeError(
            f"{where} takes a `*ForCausalLM` model (with its LM head), got the base model {type(model).__name__}: "
            "load it with AutoModelForCausalLM.from_pretrained."
        )
    params = list(model.parameters())
    offloaded = hasattr(model, "hf_device_map") or any(hasattr(m, "_hf_hook") for m in model.modules())
    if params and all(p.device.type == "meta" for p in params) and not offloaded:  # offload is checked elsewhere
        raise ValueError(
            f"{where} got a model whose weights are all on the 'meta' device (built without weights, e.g. under "
            "init_empty_weights): load the real weights with AutoModelForCausalLM.from_pretrained."
        )


def get_decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The `ModuleList` of decoder layers of a `*ForCausalLM` (or of its base model)."""
    base = get_base_model(model)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(
            f"Could not find the decoder layers of {type(model).__name__}: expected `model.{model.base_model_prefix}"
            ".layers` to be an nn.ModuleList. Pass an unwrapped transformers `*ForCausalLM` model."
        )
    return layers


def get_base_model(model: nn.Module) -> nn.Module:
    """The base model of a `*ForCausalLM` (itself for a base model). `Llama4ForCausalLM` names the prefix of the
    multimodal model that wraps it (`language_model`) but holds its own base model at `model`."""
    base = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    return base if base is not None else getattr(model, "model", model)
