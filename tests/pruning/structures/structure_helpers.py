"""What the per-structure tests share: a padded batch, a structure's hooks run alone, and one structure's steps of
`prune_model` (its selection and slicing, then the config fields and every structure's cached sizes, in order)."""

import torch

from hf_minitron import PrunedConfig
from hf_minitron.architectures import get_architecture, get_base_model, get_decoder_layers
from hf_minitron.pruning.importance import _Collector, model_shape
from hf_minitron.pruning.prune import PruningRecord
from hf_minitron.pruning.structures import in_layer, structures_of


def padded(samples):
    """Right-padded `input_ids` and `attention_mask` of `samples`."""
    length = max(len(s["input_ids"]) for s in samples)
    ids = torch.zeros(len(samples), length, dtype=torch.long)
    mask = torch.zeros(len(samples), length, dtype=torch.long)
    for i, s in enumerate(samples):
        ids[i, : len(s["input_ids"])] = s["input_ids"]
        mask[i, : len(s["input_ids"])] = 1
    return ids, mask


def samples(n: int = 4, lengths=(10, 7, 9, 5)):
    """`n` samples of ragged lengths (padding is exercised), seeded."""
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(3, 96, (lengths[i % len(lengths)],), generator=g)} for i in range(n)]


def collect(model, structure, batch, how: str = "mean"):
    """`batch` (one right-padded batch) through `model` with only `structure`'s hooks: the collector."""
    collector = _Collector(model, how, depth=False)
    ids, mask = padded(batch)
    collector.mask = mask.float()
    collector.token_mask = collector.mask.reshape(-1)
    collector.sample_mask = None if bool(mask.all()) else collector.mask
    handles = []
    for i, layer in enumerate(collector.layers):
        if in_layer(collector.spec, layer, structure):
            handles += structure.hooks(collector, i, layer)
    try:
        with torch.no_grad():
            get_base_model(model)(input_ids=ids, attention_mask=mask, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return collector


def prune_steps(model, scores, pruned, updated=None, record=None, **targets):
    """The steps of `prune_model` for the structures `pruned` alone: their selection and slicing, the config fields of
    `updated` (every structure of the family by default), then every structure's cached sizes in order, as
    `prune_model` does (a field such as `intermediate_size` is also a Mamba mixer's, which its structure sets back)."""
    spec = get_architecture(model.config)
    source = model_shape(model.config)
    config = PrunedConfig(**targets)
    target = config.resolve(model.config)
    kept_layers = list(range(source["num_hidden_layers"]))
    record = record or PruningRecord({}, source, target, kept_layers, [])
    layers = get_decoder_layers(model)
    with torch.no_grad():
        for structure in pruned:
            structure.prune(model, layers, spec, scores, source, target, kept_layers, record, config)
    for structure in structures_of(spec) if updated is None else updated:
        structure.update_config(model.config, spec, source, target)
    for structure in structures_of(spec):
        structure.sync_modules(model, model.config, spec)
    return record
