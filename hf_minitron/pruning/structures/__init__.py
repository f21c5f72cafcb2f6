"""The prunable structures, one module each.

| structure | module | `PrunedConfig` targets (`FIELDS`) |
|---|---|---|
| layers (depth) | `depth.py` | `num_hidden_layers` (or `layers_to_drop`, `num_layers_by_type`) |
| hidden (embedding) channels | `hidden_channels.py` | `hidden_size` |
| MLP neurons | `mlp_neurons.py` | `intermediate_size` (per layer, Gemma 3n: `intermediate_size_per_layer`) |
| attention heads and KV groups | `attention_heads.py` | `num_attention_heads`, `num_key_value_heads` |
| attention experts and their KV heads (JetMoE's MoA) | `attention_experts.py` | those, and `num_experts` |
| MLA heads and latent ranks | `latent_attention_heads.py` | `num_attention_heads`, `q_lora_rank`, `kv_lora_rank` |
| routed experts (MoE) | `routed_experts.py` | `num_experts` |
| expert neurons (MoE expert width) | `expert_neurons.py` | `moe_intermediate_size` |
| shared-expert neurons (MoE) | `shared_expert_neurons.py` | `shared_expert_intermediate_size` |
| Mamba2 heads and head channels (hybrids) | `mamba_heads.py` | `mamba_num_heads`, `mamba_head_dim` |
| Gated DeltaNet heads (Qwen3-Next, Qwen3.5) | `deltanet_heads.py` | `linear_num_value_heads`, `linear_num_key_heads` |
| short-conv channels (LFM2) | `short_conv_channels.py` | none: they follow `hidden_size` |

Each module declares what the rest of the package derives from it (the contract is in `CONTRIBUTING.md`): its
`PrunedConfig` fields with their docs and `--help` (`CONFIG_FIELDS`, `fields.py`; the targets among them are
`FIELDS`), its sizes in `model_shape` (`shape`), its search axes (`AXES`, which give `SearchConfig` its fields), its
model-card and summary rows (`CARD_ROWS`, `SUMMARY`), its `PruningRecord` entries (`RECORD`), the checks of its
fields (`prepare_config`, `check_applies`, `check_target`) and, for a width structure, its importance statistics
(`SCORE_KEYS`, the `ImportanceScores` fields). `PrunedConfig`, `SearchConfig`, `ImportanceScores`, `PruningRecord`,
`model_shape`, the search, the card and the summary are assembled by walking `STRUCTURES`; `importance.py` and
`prune.py` walk the width structures a family has.

Each width structure's module also owns its activation hooks (`hooks`, `sites`), its scores (`scores`, `collect`,
`magnitude_scores`, `random_scores`), its selection and in-place slicing (`prune`, `slice_hidden`), the config fields
it changes (`update_config`, `sync_modules`) and its parameter-count terms (`count_roles`, `count_sizes`).
`estimate_importance`, `prune_model` and `count_parameters` walk the structures a family has (`structures_of`); an
`ArchitectureSpec` says where their modules live. In a hybrid family (Nemotron-H) each decoder layer holds one block: a
structure's `BLOCK` names the block it prunes, and every per-layer loop skips the layers without it (`in_layer`); their
statistics rows stay zero.
"""

from . import (
    attention_experts,
    attention_heads,
    deltanet_heads,
    depth,
    expert_neurons,
    hidden_channels,
    latent_attention_heads,
    mamba_heads,
    mlp_neurons,
    routed_experts,
    shared_expert_neurons,
    short_conv_channels,
)


# Every structure, in the order of the targets (paper 1, Table 1: depth, then the widths: embedding, MLP, attention;
# then the MoE and Mamba structures). `PrunedConfig`'s target fields, the search axes and the card and summary rows
# follow it.
STRUCTURES = (
    depth,
    hidden_channels,
    mlp_neurons,
    attention_heads,
    # Before attention_experts, whose FIELDS name routed_experts' expert count: the latent ranks come with the heads.
    latent_attention_heads,
    attention_experts,
    routed_experts,
    expert_neurons,
    shared_expert_neurons,
    mamba_heads,
    deltanet_heads,
    short_conv_channels,
)

# Order of the width structures when pruning: whole experts before the neurons of the kept experts; hidden channels
# last, so the embedding's new copy reuses the memory freed by every other slice. It is also the order in which the
# magnitude baseline adds the other structures' weights into the hidden channels' float32 scores: another order
# changes their last bits, hence possibly the channels kept. The same structures as `STRUCTURES`, depth aside (a test
# checks it).
WIDTH_STRUCTURES = (
    attention_heads,
    attention_experts,
    latent_attention_heads,
    mlp_neurons,
    shared_expert_neurons,
    routed_experts,
    expert_neurons,
    # After attention heads and MLP neurons: their `sync_modules` set `num_heads` / `intermediate_size` on every
    # module that has one, the Mamba mixer included, and this one sets the mixer's back.
    mamba_heads,
    deltanet_heads,
    # Before hidden channels, whose count it prunes its channels to: it slices in_proj's rows while they are still
    # the source's [B, C, x] thirds.
    short_conv_channels,
    hidden_channels,
)


def structures_of(spec) -> tuple:
    """The width structures a family described by `spec` has, in pruning order."""
    return tuple(s for s in WIDTH_STRUCTURES if s.present(spec))


def structures_in(model_config, spec) -> tuple:
    """The structures a model of `model_config` has, in the order of `STRUCTURES`: depth, hidden channels, and each
    width structure of its family whose block some layer holds (a Nemotron-H without MoE layers has no experts,
    though its config sizes them). Their `SUMMARY` and `CARD_ROWS` sizes are the ones the model has."""
    blocks = depth.block_names(model_config)
    typed = {block for block, _ in spec.block_types} | ({"mlp", "moe"} if spec.dense_layers_field else set())
    present = structures_of(spec)
    return tuple(
        s
        for s in STRUCTURES
        if s is depth or (s in present and (blocks is None or s.BLOCK not in typed or s.BLOCK in blocks))
    )


def in_layer(spec, layer, structure) -> bool:
    """Whether decoder `layer` holds the block `structure` prunes: always in a family whose layers are alike; in a
    hybrid (or a family of dense then MoE layers), when the layer's block type is the structure's `BLOCK`."""
    if not spec.block_types and spec.dense_layers_field is None:
        return True  # no BLOCK needed
    return spec.has(layer, structure.BLOCK)


__all__ = [
    "STRUCTURES",
    "WIDTH_STRUCTURES",
    "attention_experts",
    "attention_heads",
    "deltanet_heads",
    "depth",
    "expert_neurons",
    "hidden_channels",
    "in_layer",
    "latent_attention_heads",
    "mamba_heads",
    "mlp_neurons",
    "routed_experts",
    "shared_expert_neurons",
    "short_conv_channels",
    "structures_in",
    "structures_of",
]
