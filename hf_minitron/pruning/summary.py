"""Parameter breakdowns and before/after tables of a model's shape."""

from torch import nn

from ..architectures import BLOCK_TYPES, get_architecture, get_base_model, get_decoder_layers, model_shape
from .structures import structures_in
from .structures.depth import layer_counts_by_type


def parameter_breakdown(model: nn.Module) -> dict[str, int]:
    """Parameters per axis: embeddings (+ untied LM head), attention (with a hybrid's Mamba or Gated DeltaNet
    mixers), MLP, norms, and the unique total."""
    spec = get_architecture(model.config)
    counts = {"embeddings": 0, "attention": 0, "mlp": 0, "norms": 0}
    seen = set()

    def add(key, module):
        for p in module.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                counts[key] += p.numel()

    add("embeddings", model.get_input_embeddings())
    if model.get_output_embeddings() is not None:
        add("embeddings", model.get_output_embeddings())
    for name in spec.token_tables:  # Gemma 3n's per-layer input embeddings, as count_parameters counts them
        add("embeddings", getattr(get_base_model(model), name))
    # MoE families have no dense `mlp` (their experts count as MLP), hybrids hold one block per layer (their sequence
    # mixers count as attention), JetMoE's attention experts sit inside its attention module.
    blocks = [
        ("attention" if block.role == "mixer" else "mlp", block.name, getattr(spec, block.name))
        for block in sorted(BLOCK_TYPES, key=lambda block: block.role != "mixer")
    ]
    if spec.shared_expert_in_layer:  # Granite 4's shared MLP sits beside its MoE block
        blocks.append(("mlp", "moe", spec.shared_expert))
    for layer in get_decoder_layers(model):
        for key, block, path in blocks:
            if path is not None and spec.has(layer, block) and hasattr(layer, path.split(".")[0]):
                add(key, layer.get_submodule(path))
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            counts["norms"] += p.numel()
    counts["total"] = sum(counts.values())
    counts["non_embedding"] = counts["total"] - counts["embeddings"]
    return counts


def shape_summary(model: nn.Module) -> dict:
    """Shape fields and parameter counts of `model`, as plain data (for tables, cards and JSON)."""
    config = model.config
    shape = model_shape(config)
    # Each `SUMMARY` size of the structures the model has, then a hybrid's layers of each block type. Only those: a
    # family without a dense MLP may still have its field (Mixtral's `intermediate_size` is its experts' width).
    structures = structures_in(config, get_architecture(config))
    summary = {name: shape[name] for structure in structures for name in structure.SUMMARY if name in shape}
    if layer_counts_by_type(config) is not None:
        summary["num_layers_by_type"] = layer_counts_by_type(config)
    return summary | {"parameters": parameter_breakdown(model)}


def comparison_rows(before: dict, after: dict) -> list[tuple[str, str, str, str]]:
    """`(quantity, before, after, ratio)` rows comparing two `shape_summary` results."""
    rows = []
    for name in (name for name in before if name not in ("num_layers_by_type", "parameters")):
        if name not in after:  # depth pruning removed every layer of its block (DeepSeek-V3's dense first layers)
            rows.append((name, str(before[name]), "-", "-"))
        else:
            rows.append((name, str(before[name]), str(after[name]), f"{after[name] / before[name]:.2f}"))
    for block, count in (before.get("num_layers_by_type") or {}).items():
        new = after["num_layers_by_type"].get(block, 0)
        rows.append((f"layers: {block}", str(count), str(new), f"{new / count:.2f}"))
    for name, value in before["parameters"].items():
        new = after["parameters"][name]
        rows.append((f"params: {name}", f"{value:,}", f"{new:,}", f"{new / value:.2f}" if value else "-"))
    return rows


def print_comparison(before: dict, after: dict, title: str = "Pruning summary") -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for column in ("", "before", "after", "ratio"):
        table.add_column(column, justify="right" if column else "left")
    for row in comparison_rows(before, after):
        table.add_row(*row)
    Console().print(table)
