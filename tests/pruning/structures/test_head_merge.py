"""Residual head merge (paper 1, arXiv 2407.14679 §2.3): `head_i + (head_i - head_{2K-i+1})` on the heads' query rows
(MHA: query, key and value rows), or on their `o_proj` columns, computed directly from the source weights."""

import copy
import json

import pytest
import torch
from conftest import _static_scores, logits, tiny_model
from transformers import AutoModelForCausalLM

from hf_minitron import PrunedConfig, load_pruning_record, prune_model
from hf_minitron.model_card import _importance_rows


HEAD_DIM = 8


def _heads(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """`[heads, head_dim, ...]` view of the rows of a projection (or its bias)."""
    return weight.detach().reshape(heads, HEAD_DIM, *weight.shape[1:])


def _merged(weight: torch.Tensor, heads: int, kept: list[int], pairs: dict[int, int]) -> torch.Tensor:
    """The rows of the kept heads, each kept head in `pairs` becoming `2 head - partner`."""
    rows = _heads(weight, heads)
    out = [2 * rows[h] - rows[pairs[h]] if h in pairs else rows[h] for h in kept]
    return torch.cat(out)


def _attention(model):
    return model.model.layers[0].self_attn


def _prune(model, head_merge: str, heads: list[float], **targets):
    scores = _static_scores(model, heads=torch.tensor([heads] * 4, dtype=torch.float64))
    return prune_model(model, PrunedConfig(head_merge=head_merge, **targets), scores=scores)


# ---------------------------------------------------------------------------------------------- grouped-query attention
def test_query_merge_gqa_pairs_heads_within_each_kv_group():
    model = tiny_model("llama", attention_bias=True)  # 4 query heads in 2 KV groups
    src = copy.deepcopy(_attention(model))
    # Group 0: head 1 kept, head 0 pruned; group 1: head 2 kept, head 3 pruned.
    pruned = _prune(model, "query", [0.2, 0.9, 0.7, 0.1], num_attention_heads=2)
    attn = _attention(pruned)
    assert pruned.pruning_record.heads[0] == [1, 2]
    pairs = {1: 0, 2: 3}
    torch.testing.assert_close(attn.q_proj.weight, _merged(src.q_proj.weight, 4, [1, 2], pairs))
    torch.testing.assert_close(attn.q_proj.bias, _merged(src.q_proj.bias, 4, [1, 2], pairs))
    # Grouped-query attention: only the query heads are merged (paper 1 §2.3); keys, values, o_proj are the originals.
    for name in ("k_proj", "v_proj"):
        torch.testing.assert_close(getattr(attn, name).weight, getattr(src, name).weight)
        torch.testing.assert_close(getattr(attn, name).bias, getattr(src, name).bias)
    o = src.o_proj.weight.view(32, 4, HEAD_DIM)
    torch.testing.assert_close(attn.o_proj.weight, o[:, [1, 2]].reshape(32, -1))


def test_query_merge_mirrors_around_the_cut():
    model = tiny_model("llama", num_key_value_heads=1)  # one group of 4 heads
    src = copy.deepcopy(_attention(model))
    # Ranks h1 > h3 > h0 > h2; K=2 of L=4: rank 1 absorbs rank 4 (h2), rank 2 absorbs rank 3 (h0).
    pruned = _prune(model, "query", [0.4, 0.9, 0.1, 0.7], num_attention_heads=2)
    assert pruned.pruning_record.heads[0] == [1, 3]
    expected = _merged(src.q_proj.weight, 4, [1, 3], {1: 2, 3: 0})
    torch.testing.assert_close(_attention(pruned).q_proj.weight, expected)


def test_query_merge_leaves_heads_without_a_partner_unchanged():
    model = tiny_model("llama", num_key_value_heads=1, hidden_size=24)  # 3 heads must divide the hidden size
    src = copy.deepcopy(_attention(model))
    # K=3 of L=4: only rank 3 (h3) absorbs rank 4 (h2); ranks 1 and 2 (h1, h0) keep their rows.
    pruned = _prune(model, "query", [0.4, 0.9, 0.1, 0.3], num_attention_heads=3)
    q = _heads(_attention(pruned).q_proj.weight, 3)
    original = _heads(src.q_proj.weight, 4)
    assert pruned.pruning_record.heads[0] == [0, 1, 3]
    torch.testing.assert_close(q[0], original[0])
    torch.testing.assert_close(q[1], original[1])
    torch.testing.assert_close(q[2], 2 * original[3] - original[2])


def test_o_proj_merge_changes_only_o_proj_columns():
    model = tiny_model("llama", attention_bias=True)
    src = copy.deepcopy(_attention(model))
    pruned = _prune(model, "o_proj", [0.2, 0.9, 0.7, 0.1], num_attention_heads=2)
    attn = _attention(pruned)
    o = src.o_proj.weight.view(32, 4, HEAD_DIM)
    expected = torch.cat([2 * o[:, 1] - o[:, 0], 2 * o[:, 2] - o[:, 3]], dim=1)
    torch.testing.assert_close(attn.o_proj.weight, expected)
    torch.testing.assert_close(attn.o_proj.bias, src.o_proj.bias)  # over the hidden size: no head in it
    torch.testing.assert_close(attn.q_proj.weight, _heads(src.q_proj.weight, 4)[[1, 2]].reshape(-1, 32))


def test_no_merge_by_default_keeps_the_sliced_originals():
    assert PrunedConfig().head_merge == "none"
    model = tiny_model("llama")
    src = copy.deepcopy(_attention(model))
    pruned = _prune(model, "none", [0.2, 0.9, 0.7, 0.1], num_attention_heads=2)
    torch.testing.assert_close(_attention(pruned).q_proj.weight, _heads(src.q_proj.weight, 4)[[1, 2]].reshape(-1, 32))


# ---------------------------------------------------------------------------------------------- multi-head attention
def test_query_merge_mha_merges_query_key_and_value_rows_across_the_layer():
    model = tiny_model("llama", num_key_value_heads=4, attention_bias=True)  # MHA: a KV head per query head
    src = copy.deepcopy(_attention(model))
    # Every KV group is one head, kept or removed whole, so the heads of the layer are paired: ranks h1 > h3 > h0 > h2.
    pruned = _prune(model, "query", [0.4, 0.9, 0.1, 0.7], num_attention_heads=2, num_key_value_heads=2)
    attn = _attention(pruned)
    assert pruned.pruning_record.heads[0] == [1, 3] and pruned.pruning_record.kv_heads[0] == [1, 3]
    pairs = {1: 2, 3: 0}
    for name in ("q_proj", "k_proj", "v_proj"):
        torch.testing.assert_close(getattr(attn, name).weight, _merged(getattr(src, name).weight, 4, [1, 3], pairs))
        torch.testing.assert_close(getattr(attn, name).bias, _merged(getattr(src, name).bias, 4, [1, 3], pairs))
    o = src.o_proj.weight.view(32, 4, HEAD_DIM)
    torch.testing.assert_close(attn.o_proj.weight, o[:, [1, 3]].reshape(32, -1))


def test_query_merge_mha_with_a_fused_qkv_projection():
    model = tiny_model("phi3", num_key_value_heads=4)  # rows [q (4 heads), k (4), v (4)] in one qkv_proj
    src = copy.deepcopy(_attention(model))
    pruned = _prune(model, "query", [0.4, 0.9, 0.1, 0.7], num_attention_heads=2, num_key_value_heads=2)
    q, k, v = src.qkv_proj.weight.chunk(3)
    expected = torch.cat([_merged(w, 4, [1, 3], {1: 2, 3: 0}) for w in (q, k, v)])
    torch.testing.assert_close(_attention(pruned).qkv_proj.weight, expected)


def test_o_proj_merge_mha_pairs_across_the_layer():
    model = tiny_model("llama", num_key_value_heads=4)
    src = copy.deepcopy(_attention(model))
    pruned = _prune(model, "o_proj", [0.4, 0.9, 0.1, 0.7], num_attention_heads=2, num_key_value_heads=2)
    o = src.o_proj.weight.view(32, 4, HEAD_DIM)
    expected = torch.cat([2 * o[:, 1] - o[:, 2], 2 * o[:, 3] - o[:, 0]], dim=1)
    torch.testing.assert_close(_attention(pruned).o_proj.weight, expected)
    torch.testing.assert_close(_attention(pruned).k_proj.weight, _heads(src.k_proj.weight, 4)[[1, 3]].reshape(-1, 32))


# ---------------------------------------------------------------------------------------------- checkpoints, config
@pytest.mark.parametrize("head_merge", ["query", "o_proj"])
def test_merged_checkpoint_reloads_with_stock_transformers(head_merge, tmp_path):
    model = tiny_model("llama", attention_bias=True)
    pruned = _prune(model, head_merge, [0.2, 0.9, 0.7, 0.1], num_attention_heads=2)
    unmerged = _prune(tiny_model("llama", attention_bias=True), "none", [0.2, 0.9, 0.7, 0.1], num_attention_heads=2)
    assert not torch.allclose(logits(pruned), logits(unmerged))
    pruned.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    torch.testing.assert_close(logits(reloaded), logits(pruned))
    config, _ = load_pruning_record(tmp_path)
    assert config.head_merge == head_merge
    assert json.loads((tmp_path / "pruned_config.json").read_text())["head_merge"] == head_merge


def test_head_merge_json_round_trip_and_earlier_booleans(tmp_path):
    config = PrunedConfig(num_attention_heads=2, head_merge="query")
    config.save_pretrained(tmp_path)
    assert PrunedConfig.from_pretrained(tmp_path) == config
    # Configs saved by earlier versions hold a boolean: `true` merged the o_proj columns.
    for value, expected in ((True, "o_proj"), (False, "none")):
        path = tmp_path / f"old_{value}.json"
        path.write_text(json.dumps({"num_attention_heads": 2, "head_merge": value}))
        assert PrunedConfig.from_file(path).head_merge == expected
    (tmp_path / "recipe.yaml").write_text("head_merge: query\n")
    assert PrunedConfig.from_file(tmp_path / "recipe.yaml").head_merge == "query"


@pytest.mark.parametrize("value", ["yes", "qkv", "o_proj_columns", 1])
def test_invalid_head_merge_names_the_field_and_the_choices(value):
    with pytest.raises(ValueError, match=r"PrunedConfig\.head_merge=.*choose one of \['none', 'query', 'o_proj'\]"):
        PrunedConfig(head_merge=value)


def test_model_card_names_the_merge_variant():
    assert not any(key == "Head merging" for key, _ in _importance_rows({"head_merge": "none"}))
    assert ("Head merging", "query (paper 1, §2.3)") in _importance_rows({"head_merge": "query"})
    assert ("Head merging", "o_proj (paper 1, §2.3)") in _importance_rows({"head_merge": True})
