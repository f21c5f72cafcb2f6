"""`PrunedConfig`: the target architecture and how importance is estimated.

Like a PEFT config, it is a plain dataclass that saves and loads as JSON next to the weights
(`pruned_config.json`), so a pruned checkpoint records how it was made.
"""

import json
import os
from collections import Counter
from dataclasses import asdict, dataclass, field, fields


PRUNED_CONFIG_NAME = "pruned_config.json"

SEQUENCE_AGGREGATIONS = ("mean", "l2", "var")
BATCH_AGGREGATIONS = ("l2", "mean", "var")
DEPTH_METHODS = ("contiguous", "block_influence", "lm_loss", "explicit")
# What ranks the candidate blocks of `depth_method="contiguous"`: the LM loss without the block, or the block's own
# Block Influence (paper 1 §2.2: 1 - cos between the block's input and its output).
CONTIGUOUS_SCORES = ("lm_loss", "block_influence")
IMPORTANCE_METHODS = ("activation", "magnitude", "random")
EXPERT_IMPORTANCE = ("output_norm", "reap", "frequency")
# Residual head merge (paper 1 §2.3): off, on the query (MHA: query/key/value) rows, or on the `o_proj` columns.
HEAD_MERGES = ("none", "query", "o_proj")
_TARGET_FIELDS = (
    "num_hidden_layers",
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
)
# Mixture-of-Experts targets, named the same for every family (each family's config field is in its spec).
_MOE_FIELDS = ("num_experts", "moe_intermediate_size", "shared_expert_intermediate_size")
# Mamba2 targets of hybrid models (Nemotron-H).
_MAMBA_FIELDS = ("mamba_num_heads", "mamba_head_dim")


@dataclass
class PrunedConfig:
    """Target shape of a pruned model and the options of Minitron importance estimation.

    Every target left to `None` keeps the source model's value.

    Args:
        num_hidden_layers (`int`, *optional*):
            Target number of decoder layers (depth pruning).
        num_layers_by_type (`dict[str, int]`, *optional*):
            Hybrids: target number of layers of each block type, e.g. `{"mamba": 20, "attention": 4, "mlp": 20}`, keyed
            by the block names of NVIDIA's Nemotron-H configs and papers (`"mamba"`, `"attention"`, `"mlp"`, `"moe"`:
            the `M`, `*`, `-`, `E` of its `hybrid_override_pattern`); transformers' own names of the block types
            (`"linear_attention"`, `"full_attention"`) are accepted too. A type left out keeps all its layers. The
            depth method then chooses within each type (`"contiguous"`: among the blocks of consecutive layers that
            hold exactly the layers to remove). On the command line, a JSON mapping.
        hidden_size (`int`, *optional*):
            Target embedding (hidden) size. The same channels are removed from every layer (paper 1, §2.2).
        intermediate_size (`int`, *optional*):
            Target number of MLP neurons per layer.
        num_attention_heads (`int`, *optional*):
            Target number of query heads per layer. `head_dim` never changes.
        num_key_value_heads (`int`, *optional*):
            Target number of KV heads (groups). Kept by default; pruning them removes whole groups.
        num_experts (`int`, *optional*):
            MoE: target number of routed experts per layer (the same in every layer, so the config stays uniform).
        moe_intermediate_size (`int`, *optional*):
            MoE: target FFN width of each routed expert (Mixtral and GPT-OSS call it `intermediate_size`). Every
            expert keeps the same number of neurons, its own indices.
        shared_expert_intermediate_size (`int`, *optional*):
            MoE: target width of the shared expert (Qwen2-MoE).
        mamba_num_heads (`int`, *optional*):
            Hybrids: target number of Mamba2 heads per Mamba layer, a multiple of the B/C groups (`n_groups`): every
            group keeps the same number of its own heads (Minitron-SSM, https://arxiv.org/abs/2504.11409).
        mamba_head_dim (`int`, *optional*):
            Hybrids: target channels per Mamba2 head (the same channels kept in every head).
        mamba_group_aware (`bool`, *optional*, defaults to `True`):
            Rank Mamba heads within each B/C group (the paper's method). `False` is the paper's group-blind baseline:
            the top heads overall, reassigned to groups by position (see `structures/mamba_heads.py`).
        layers_to_drop (`list[int]`, *optional*):
            Explicit 0-based indices of layers to remove (sets `depth_method="explicit"`).
        depth_method (`str`, *optional*, defaults to `"contiguous"`):
            How layers are chosen: `"contiguous"` (the block of consecutive layers whose removal costs least, paper 2),
            `"block_influence"` (1 - cos(input, output) per layer), `"lm_loss"` (LM-loss increase when each single
            layer is dropped) or `"explicit"`.
        contiguous_score (`str`, *optional*, defaults to `"lm_loss"`):
            What ranks the candidate blocks of `depth_method="contiguous"`: `"lm_loss"` (the LM loss with the block
            dropped, one forward over the depth samples per block) or `"block_influence"` (the Block Influence of the
            block, 1 - cos between the input of its first layer and the output of its last, averaged over tokens:
            paper 1 §2.2's extension of BI to several contiguous layers). Block Influence costs no extra forward: the
            importance pass measures it for every block, holding each layer's input for the batch meanwhile
            (num_layers x calibration_batch_size x sequence x hidden values, in the model's dtype).
        depth_scorer (`str`, *optional*):
            lm-eval task(s), comma separated, e.g. `"winogrande"`: the layers to drop (`"contiguous"`, `"lm_loss"`) are
            the candidate whose removal keeps the mean accuracy (primary metric) highest, instead of the lowest LM
            loss. Paper 2 picked its contiguous block by Winogrande accuracy: the LM loss "fails to produce the most
            accurate" block. Costly: one lm-eval evaluation per candidate (SmolLM2, 6 of 30 layers: 25 blocks), so
            keep `depth_scorer_limit` small. `hf-minitron prune` and `recipes/prune.py` build the scorer with the
            model's tokenizer; with `prune_model`, pass `depth_scorer=make_lm_eval_scorer(tokenizer, ...)`.
        depth_scorer_num_fewshot (`int`, *optional*, defaults to `0`):
            Shots of `depth_scorer`'s tasks (`None`: each task's default).
        depth_scorer_limit (`int`, *optional*):
            Documents of each `depth_scorer` task per candidate (lm-eval takes the first ones); `None`: all of them.
        depth_calibration_samples (`int`, *optional*, defaults to `64`):
            Samples used to score each candidate removal for `"lm_loss"` and `"contiguous"` depth selection.
        depth_screening_samples (`int`, *optional*, defaults to `16`):
            `"contiguous"` depth selection scores every candidate block on this many samples first and rescores only
            the 3 best on all `depth_calibration_samples` (2.7x fewer forwards for SmolLM2's 25 blocks). `None`
            scores every block on every sample.
        importance (`str`, *optional*, defaults to `"activation"`):
            `"activation"` is Minitron's forward-only activation importance. `"magnitude"` (weight L2 norms) and
            `"random"` are the baselines of the paper's ablations.
        sequence_aggregation (`str`, *optional*, defaults to `"mean"`):
            Reduction over the tokens of a sample: `"mean"` (mean of |x|), `"l2"` or `"var"`.
        batch_aggregation (`str`, *optional*, defaults to `"l2"`):
            Reduction over samples: `"l2"`, `"mean"` or `"var"` (paper 1, Table 11: sequence mean, batch L2 is best).
        calibration_samples (`int`, *optional*, defaults to `1024`):
            Number of calibration samples (paper 1 uses 1024).
        calibration_batch_size (`int`, *optional*, defaults to `8`):
            Forward batch size during importance estimation.
        calibration_seq_length (`int`, *optional*, defaults to `512`):
            Sequence length when raw text is tokenized for calibration.
        expert_importance (`str`, *optional*, defaults to `"reap"`):
            How routed experts are ranked with `importance="activation"`: `"output_norm"` (mean L2 norm of the
            expert's output over its routed tokens, NVIDIA ModelOpt's estimator), `"reap"` (mean router weight x
            output norm, https://arxiv.org/abs/2510.13999) or `"frequency"` (tokens routed to it). The default is the
            output-based estimator that kept the real-weight MoE of `benchmarks/moe_prune_quality.py` better.
        head_merge (`str`, *optional*, defaults to `"none"`):
            Residual head merge (paper 1, §2.3): before a pruned head is removed, the kept head paired with it becomes
            `head_i + (head_i - head_{2K-i+1})`. `"query"` applies it to the heads' own projection weights, as the
            paper describes: the query rows (and bias) of each kept/pruned pair within a KV group, and for MHA
            models the key and value rows too; `"o_proj"` applies it to the heads' `o_proj` columns instead;
            `"none"` turns it off. `true` / `false` (the boolean of earlier versions, in saved configs) read as
            `"o_proj"` / `"none"`, what they did then.
        seed (`int`, *optional*, defaults to `0`):
            Seed of the `"random"` baseline.
    """

    num_hidden_layers: int | None = field(default=None, metadata={"help": "Target number of decoder layers."})
    num_layers_by_type: dict[str, int] | str | None = field(
        default=None,
        metadata={
            "help": 'Hybrids: target layers of each block type, a JSON mapping, e.g. \'{"mamba": 20, "attention": 4, '
            '"mlp": 20}\' (types left out keep all their layers).'
        },
    )
    hidden_size: int | None = field(default=None, metadata={"help": "Target hidden (embedding) size."})
    intermediate_size: int | None = field(default=None, metadata={"help": "Target MLP intermediate size."})
    num_attention_heads: int | None = field(default=None, metadata={"help": "Target query heads per layer."})
    num_key_value_heads: int | None = field(
        default=None, metadata={"help": "Target KV heads per layer (kept unless set)."}
    )
    num_experts: int | None = field(default=None, metadata={"help": "MoE: target routed experts per layer."})
    moe_intermediate_size: int | None = field(default=None, metadata={"help": "MoE: target width of each expert."})
    shared_expert_intermediate_size: int | None = field(
        default=None, metadata={"help": "MoE: target width of the shared expert."}
    )
    mamba_num_heads: int | None = field(
        default=None, metadata={"help": "Hybrids: target Mamba2 heads per Mamba layer (a multiple of n_groups)."}
    )
    mamba_head_dim: int | None = field(default=None, metadata={"help": "Hybrids: target channels per Mamba2 head."})
    mamba_group_aware: bool = field(
        default=True,
        metadata={"help": "Rank Mamba heads within each B/C group (Minitron-SSM); false: the group-blind baseline."},
    )
    layers_to_drop: list[int] | None = field(
        default=None, metadata={"help": "Explicit 0-based layer indices to remove (implies depth_method='explicit')."}
    )
    depth_method: str = field(
        default="contiguous",
        metadata={"help": "Depth selection.", "choices": DEPTH_METHODS},
    )
    contiguous_score: str = field(
        default="lm_loss",
        metadata={
            "help": "Contiguous depth search: rank blocks by 'lm_loss' (a forward per block) or 'block_influence' "
            "(1 - cos(block input, block output), measured in the importance pass).",
            "choices": CONTIGUOUS_SCORES,
        },
    )
    depth_scorer: str | None = field(
        default=None,
        metadata={
            "help": "lm-eval task(s), comma separated (e.g. winogrande), whose accuracy picks the layers to drop "
            "instead of the LM loss: one evaluation per candidate."
        },
    )
    depth_scorer_num_fewshot: int | None = field(
        default=0, metadata={"help": "Shots of the depth_scorer tasks (None: each task's default)."}
    )
    depth_scorer_limit: int | None = field(
        default=None, metadata={"help": "Documents of each depth_scorer task per candidate (None: all)."}
    )
    depth_calibration_samples: int = field(
        default=64, metadata={"help": "Samples used to score candidate layer removals (lm_loss, contiguous)."}
    )
    depth_screening_samples: int | None = field(
        default=16,
        metadata={"help": "Contiguous search: score every block on this many samples, rescore the best 3 on all."},
    )
    importance: str = field(
        default="activation", metadata={"help": "Importance method.", "choices": IMPORTANCE_METHODS}
    )
    sequence_aggregation: str = field(
        default="mean", metadata={"help": "Reduction over tokens.", "choices": SEQUENCE_AGGREGATIONS}
    )
    batch_aggregation: str = field(
        default="l2", metadata={"help": "Reduction over samples.", "choices": BATCH_AGGREGATIONS}
    )
    calibration_samples: int = field(default=1024, metadata={"help": "Number of calibration samples."})
    calibration_batch_size: int = field(default=8, metadata={"help": "Batch size of the calibration passes."})
    calibration_seq_length: int = field(default=512, metadata={"help": "Token length when calibration text is raw."})
    expert_importance: str = field(
        default="reap", metadata={"help": "MoE: how experts are ranked.", "choices": EXPERT_IMPORTANCE}
    )
    head_merge: str = field(
        default="none",
        metadata={
            "help": "Residual head merge (paper 1 §2.3): 'query' (the heads' q rows; MHA: q/k/v), 'o_proj' (their "
            "o_proj columns) or 'none'.",
            "choices": HEAD_MERGES,
        },
    )
    seed: int = field(default=0, metadata={"help": "Seed for the random-selection baseline."})

    def __post_init__(self):
        if isinstance(self.head_merge, bool):
            # Saved configs of earlier versions hold a boolean, and `true` merged the o_proj columns.
            self.head_merge = "o_proj" if self.head_merge else "none"
        if isinstance(self.num_layers_by_type, str):  # from the command line
            try:
                self.num_layers_by_type = (
                    json.loads(self.num_layers_by_type) if self.num_layers_by_type.strip() else None
                )
            except json.JSONDecodeError:
                raise ValueError(
                    f"PrunedConfig.num_layers_by_type={self.num_layers_by_type!r} is not valid JSON: pass a mapping of "
                    'block type to layer count, e.g. \'{"mamba": 20, "attention": 4, "mlp": 20}\'.'
                ) from None
        if isinstance(self.depth_scorer, str) and not self.depth_scorer.strip():  # `--depth_scorer ""`
            self.depth_scorer = None
        if self.layers_to_drop is not None:
            # A string would iterate by character ("12" -> [1, 2]) and int() would truncate 1.5: both are typos.
            if not isinstance(self.layers_to_drop, (list, tuple)) or not all(
                isinstance(i, int) and not isinstance(i, bool) for i in self.layers_to_drop
            ):
                raise ValueError(
                    f"PrunedConfig.layers_to_drop={self.layers_to_drop!r} is invalid: expected a list of 0-based layer "
                    "indices, e.g. [12, 13, 14] (in YAML: `layers_to_drop: [12, 13, 14]`)."
                )
            self.layers_to_drop = sorted(self.layers_to_drop)
            if self.depth_method != "explicit":
                self.depth_method = "explicit"
        self._validate_standalone()

    # ------------------------------------------------------------------ validation
    def _validate_standalone(self):
        for name in _TARGET_FIELDS + _MOE_FIELDS + _MAMBA_FIELDS:
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise ValueError(
                    f"PrunedConfig.{name}={value!r} is invalid: expected a positive integer, or None to keep the "
                    f"source model's {name}."
                )
        for name, choices in (
            ("depth_method", DEPTH_METHODS),
            ("contiguous_score", CONTIGUOUS_SCORES),
            ("importance", IMPORTANCE_METHODS),
            ("sequence_aggregation", SEQUENCE_AGGREGATIONS),
            ("batch_aggregation", BATCH_AGGREGATIONS),
            ("expert_importance", EXPERT_IMPORTANCE),
            ("head_merge", HEAD_MERGES),
        ):
            if getattr(self, name) not in choices:
                raise ValueError(
                    f"PrunedConfig.{name}={getattr(self, name)!r} is not supported: choose one of {list(choices)}."
                )
        by_type = self.num_layers_by_type
        if by_type is not None and (
            not isinstance(by_type, dict)
            or not by_type
            or not all(
                isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v >= 0
                for k, v in by_type.items()
            )
        ):
            raise ValueError(
                f"PrunedConfig.num_layers_by_type={by_type!r} is invalid: expected a mapping of block type to the number "
                'of its layers to keep (an integer >= 0), e.g. {"mamba": 20, "attention": 4, "mlp": 20} (in YAML: '
                "`num_layers_by_type: {mamba: 20, attention: 4, mlp: 20}`), or None."
            )
        if not isinstance(self.mamba_group_aware, bool):
            raise ValueError(
                f"PrunedConfig.mamba_group_aware={self.mamba_group_aware!r} is invalid: expected true or false."
            )
        for name in (
            "calibration_samples",
            "calibration_batch_size",
            "calibration_seq_length",
            "depth_calibration_samples",
        ):
            value = getattr(self, name)
            # bool is an int in Python: `calibration_samples: true` in a YAML is a typo, not 1 sample.
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"PrunedConfig.{name}={value!r} is invalid: expected a positive integer.")
        value = self.depth_screening_samples
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            raise ValueError(
                f"PrunedConfig.depth_screening_samples={value!r} is invalid: expected a positive integer, or None to "
                "score every candidate block on every depth sample."
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"PrunedConfig.seed={self.seed!r} is invalid: expected an integer.")
        if self.depth_method == "explicit" and not self.layers_to_drop:
            raise ValueError(
                "PrunedConfig.depth_method='explicit' needs layers_to_drop: pass the 0-based layer indices to remove, "
                "or choose depth_method 'contiguous', 'block_influence' or 'lm_loss'."
            )
        if self.layers_to_drop is not None and len(set(self.layers_to_drop)) != len(self.layers_to_drop):
            raise ValueError(
                f"PrunedConfig.layers_to_drop={self.layers_to_drop} has duplicates: list each layer once."
            )
        self._validate_depth_scoring()
        if (
            self.num_attention_heads is not None
            and self.num_key_value_heads is not None
            and self.num_attention_heads % self.num_key_value_heads
        ):
            raise ValueError(
                f"PrunedConfig.num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}: every KV group must keep the same number of query "
                "heads. Pick a multiple."
            )

    def _validate_depth_scoring(self):
        """`contiguous_score` and the `depth_scorer` fields, against the depth method they refine."""
        method = f"depth_method={self.depth_method!r}" + (" (set by layers_to_drop)" if self.layers_to_drop else "")
        if self.contiguous_score == "block_influence" and self.depth_method != "contiguous":
            raise ValueError(
                f"PrunedConfig.contiguous_score='block_influence' ranks the blocks of depth_method='contiguous', but "
                f"{method}. Use depth_method='contiguous', or leave contiguous_score at 'lm_loss'."
            )
        if self.contiguous_score == "block_influence" and self.importance != "activation":
            raise ValueError(
                f"PrunedConfig.contiguous_score='block_influence' is measured on activations, but importance="
                f"{self.importance!r} ranks layers by its own static scores. Use importance='activation', or leave "
                "contiguous_score at 'lm_loss'."
            )
        shots, limit = self.depth_scorer_num_fewshot, self.depth_scorer_limit
        if shots is not None and (isinstance(shots, bool) or not isinstance(shots, int) or shots < 0):
            raise ValueError(
                f"PrunedConfig.depth_scorer_num_fewshot={shots!r} is invalid: expected an integer >= 0, or None for "
                "each task's default."
            )
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0):
            raise ValueError(
                f"PrunedConfig.depth_scorer_limit={limit!r} is invalid: expected a positive number of documents, or "
                "None for all of them."
            )
        if self.depth_scorer is None:
            return
        if not isinstance(self.depth_scorer, str) or not all(self.depth_scorer_tasks()):
            raise ValueError(
                f"PrunedConfig.depth_scorer={self.depth_scorer!r} is invalid: expected lm-eval task names, comma "
                "separated, e.g. 'winogrande' or 'winogrande,hellaswag', or None to score by LM loss."
            )
        if self.depth_method not in ("contiguous", "lm_loss"):
            raise ValueError(
                f"PrunedConfig.depth_scorer={self.depth_scorer!r} scores the candidate removals of depth_method "
                f"'contiguous' or 'lm_loss', but {method}. Use one of those, or leave depth_scorer None."
            )
        if self.contiguous_score == "block_influence":
            raise ValueError(
                f"PrunedConfig.depth_scorer={self.depth_scorer!r} and contiguous_score='block_influence' both rank the "
                "contiguous blocks: set only one of them."
            )
        if self.importance != "activation":
            raise ValueError(
                f"PrunedConfig.depth_scorer={self.depth_scorer!r} applies with importance='activation': importance="
                f"{self.importance!r} ranks layers by its own static scores. Leave depth_scorer None."
            )

    def depth_scorer_tasks(self) -> list[str]:
        """The lm-eval task names of `depth_scorer` (empty without one)."""
        return [task.strip() for task in self.depth_scorer.split(",")] if self.depth_scorer else []

    def validate_for(self, model_config) -> None:
        """Checks the targets against the source model's config; raises `ValueError` naming the field and the fix.

        Called by `prune_model` and `estimate_importance` before any forward pass.
        """
        from ..architectures import ARCHITECTURES, model_shape

        shape = model_shape(model_config)
        spec = ARCHITECTURES.get(model_config.model_type)
        for name in _MOE_FIELDS:
            if getattr(self, name) is not None and name not in shape:
                moe = sorted(k for k, v in ARCHITECTURES.items() if v.moe is not None)
                what = "routed experts" if name != "shared_expert_intermediate_size" else "a shared expert"
                raise ValueError(
                    f"PrunedConfig.{name}={getattr(self, name)} does not apply: model_type={model_config.model_type!r} "
                    f"has no {what}. Leave it None (families with experts: {', '.join(moe)})."
                )
            kind = dict(spec.block_types).get("moe") if spec is not None and spec.block_types_field else None
            if getattr(self, name) is not None and kind and kind not in getattr(model_config, spec.block_types_field):
                # A hybrid without MoE layers still has the config fields (e.g. Nemotron-H 8B: n_routed_experts=8).
                raise ValueError(
                    f"PrunedConfig.{name}={getattr(self, name)} does not apply: this model_type="
                    f"{model_config.model_type!r} model has no {kind!r} blocks in {spec.block_types_field}. Leave it "
                    "None."
                )
        if self.intermediate_size is not None and spec is not None and spec.moe is not None and spec.mlp is None:
            raise ValueError(
                f"PrunedConfig.intermediate_size={self.intermediate_size} does not apply: every feed-forward block of "
                f"model_type={model_config.model_type!r} is a mixture of experts, with no dense MLP. Use "
                "moe_intermediate_size for each expert's width (and shared_expert_intermediate_size for a shared "
                "expert)."
            )
        for name in _MAMBA_FIELDS:
            if getattr(self, name) is not None and name not in shape:
                hybrids = sorted(k for k, v in ARCHITECTURES.items() if v.mamba is not None)
                raise ValueError(
                    f"PrunedConfig.{name}={getattr(self, name)} does not apply: model_type={model_config.model_type!r} "
                    f"has no Mamba layers. Leave it None (families with Mamba layers: {', '.join(hybrids)})."
                )
        source = {name: shape[name] for name in _TARGET_FIELDS + _MOE_FIELDS + _MAMBA_FIELDS if name in shape}
        for name, value in source.items():
            target = getattr(self, name)
            if target is not None and target > value:
                raise ValueError(
                    f"PrunedConfig.{name}={target} is larger than the source model's {name}={value}: pruning only "
                    f"removes structure. Use a value <= {value}, or None to keep it."
                )
        heads = self.num_attention_heads or source["num_attention_heads"]
        kv = self.num_key_value_heads or source["num_key_value_heads"]
        if heads % kv:
            raise ValueError(
                f"PrunedConfig.num_attention_heads={heads} is not a multiple of the number of KV heads ({kv}): every KV "
                f"group must keep the same number of query heads. Use a multiple of {kv}, e.g. "
                f"{max(kv, heads // kv * kv)}."
            )
        if kv > heads:
            raise ValueError(
                f"PrunedConfig.num_key_value_heads={kv} exceeds num_attention_heads={heads}: prune KV heads too."
            )
        source_per_group = source["num_attention_heads"] // source["num_key_value_heads"]
        if heads // kv > source_per_group:
            # Pruning removes whole KV groups and heads inside groups; it never moves heads between groups.
            raise ValueError(
                f"PrunedConfig keeps {heads // kv} query heads per KV group (num_attention_heads={heads}, "
                f"num_key_value_heads={kv}), but the source model's groups hold {source_per_group}: use "
                f"num_attention_heads <= {kv * source_per_group}, or keep more KV heads."
            )
        groups = shape.get("n_groups")
        if self.mamba_num_heads is not None and self.mamba_num_heads % groups:
            # Stock transformers gives every B/C group the same number of heads (heads // n_groups).
            lower = max(groups, self.mamba_num_heads - self.mamba_num_heads % groups)
            raise ValueError(
                f"PrunedConfig.mamba_num_heads={self.mamba_num_heads} is not a multiple of the model's n_groups="
                f"{groups}: every B/C group keeps the same number of heads. Use a multiple of {groups}, e.g. {lower}"
                + (f" or {lower + groups}." if lower + groups <= shape["mamba_num_heads"] else ".")
            )
        if self.num_experts is not None and self.num_experts < shape["num_experts_per_tok"]:
            raise ValueError(
                f"PrunedConfig.num_experts={self.num_experts} is fewer than the experts each token is routed to "
                f"(num_experts_per_tok={shape['num_experts_per_tok']}): keep at least that many experts."
            )
        if self.num_experts is not None and "n_group" in shape:
            self._check_expert_groups(shape)
        layers = source["num_hidden_layers"]
        if self.layers_to_drop is not None:
            bad = [i for i in self.layers_to_drop if not 0 <= i < layers]
            if bad:
                raise ValueError(
                    f"PrunedConfig.layers_to_drop contains {bad}, out of range for a model with {layers} layers: use "
                    f"indices in [0, {layers - 1}]."
                )
            if len(self.layers_to_drop) >= layers:
                raise ValueError(f"PrunedConfig.layers_to_drop removes all {layers} layers: keep at least one.")
            from .structures.depth import check_hybrid_depth

            check_hybrid_depth(model_config, [i for i in range(layers) if i not in set(self.layers_to_drop)])
            if self.num_hidden_layers is not None and self.num_hidden_layers != layers - len(self.layers_to_drop):
                raise ValueError(
                    f"PrunedConfig.num_hidden_layers={self.num_hidden_layers} contradicts layers_to_drop (removing "
                    f"{len(self.layers_to_drop)} of {layers} layers leaves {layers - len(self.layers_to_drop)}): set "
                    "only one of them."
                )
        if self.num_layers_by_type is not None:
            self._validate_layers_by_type(model_config)

    def _validate_layers_by_type(self, model_config) -> None:
        """`num_layers_by_type` against the model: known block types, counts it has, consistent with the other depth
        fields, and a block that `depth_method="contiguous"` can remove."""
        from .structures.depth import block_names, layers_to_drop_by_type, matching_blocks, resolve_layers_by_type

        targets = resolve_layers_by_type(model_config, self.num_layers_by_type)
        total = sum(targets.values())
        field = f"PrunedConfig.num_layers_by_type={self.num_layers_by_type}"
        if self.num_hidden_layers is not None and self.num_hidden_layers != total:
            raise ValueError(
                f"PrunedConfig.num_hidden_layers={self.num_hidden_layers} contradicts {field}, which keeps {total} "
                "layers: set only one of them."
            )
        names = block_names(model_config)
        if self.layers_to_drop is not None:
            kept = Counter(name for i, name in enumerate(names) if i not in set(self.layers_to_drop))
            if any(kept[block] != count for block, count in targets.items()):
                raise ValueError(
                    f"PrunedConfig.layers_to_drop={self.layers_to_drop} keeps {dict(kept)} layers, which contradicts "
                    f"{field}: set only one of them."
                )
        drops = layers_to_drop_by_type(model_config, self.num_layers_by_type)
        if self.depth_method == "contiguous" and self.importance == "activation" and sum(drops.values()):
            if not matching_blocks(model_config, drops):
                n = sum(drops.values())
                seen = list(dict.fromkeys(str(dict(Counter(names[s : s + n]))) for s in range(len(names) - n + 1)))
                raise ValueError(
                    f"{field} removes {drops} layers, and no block of {n} consecutive layers holds exactly those "
                    f"(depth_method='contiguous' removes one block; blocks of {n} hold {', '.join(seen[:4])}). Use "
                    "depth_method='block_influence' or 'lm_loss', which choose the layers of each type, or counts "
                    "that a block matches."
                )

    def _check_expert_groups(self, shape: dict) -> None:
        """A grouped router (`n_group`, `topk_group`; Nemotron-H) views the experts as `n_group` equal groups, scores
        each group by its 2 best experts and lets a token pick its `num_experts_per_tok` experts among its
        `topk_group` best groups: the pruned count must fit all three."""
        groups, top_groups, top_k = shape["n_group"], shape["topk_group"], shape["num_experts_per_tok"]
        per_group = max(2, -(-top_k // top_groups))  # the fewest experts a group may keep
        valid = list(range(groups * per_group, shape["num_experts"] + 1, groups))
        if len(valid) <= 12:
            choose = f"Choose one of {valid}"
        else:
            choose = f"Choose a multiple of {groups} in [{valid[0]}, {valid[-1]}]"
        choose += f" (multiples of n_group={groups}, at least {per_group} per group)."
        n = self.num_experts
        if n % groups:
            raise ValueError(
                f"PrunedConfig.num_experts={n} is not a multiple of the model's n_group={groups}: the router groups the "
                f"experts in {groups} equal groups, and pruning keeps the same number in each. {choose}"
            )
        if n // groups < per_group:
            why = (
                "the router scores each group by its 2 best experts"
                if n // groups < 2
                else f"a token's topk_group={top_groups} groups must hold its num_experts_per_tok={top_k} experts"
            )
            raise ValueError(
                f"PrunedConfig.num_experts={n} leaves {n // groups} experts in each of the n_group={groups} groups, too "
                f"few: {why}. {choose}"
            )

    def resolve(self, model_config) -> dict:
        """The full target shape (source values filled in), after `validate_for`."""
        from ..architectures import model_shape

        self.validate_for(model_config)
        shape = model_shape(model_config)
        names = [name for name in _TARGET_FIELDS + _MOE_FIELDS + _MAMBA_FIELDS if name in shape]
        target = {name: getattr(self, name) or shape[name] for name in names}
        if self.layers_to_drop is not None:
            target["num_hidden_layers"] = model_config.num_hidden_layers - len(self.layers_to_drop)
        elif self.num_layers_by_type is not None:
            from .structures.depth import resolve_layers_by_type

            target["num_hidden_layers"] = sum(resolve_layers_by_type(model_config, self.num_layers_by_type).values())
        return target

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "PrunedConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"Unknown PrunedConfig field(s) {unknown}. Valid fields: {sorted(known)}. Check the spelling in your "
                "JSON/YAML file."
            )
        return cls(**data)

    def to_json_file(self, path: str | os.PathLike) -> None:
        from ..io import atomic_write_json

        atomic_write_json(path, self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "PrunedConfig":
        """Loads a `.json` or `.yaml`/`.yml` file (a directory means its `pruned_config.json`)."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, PRUNED_CONFIG_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"No PrunedConfig file at {path!r}: pass a JSON/YAML file or a pruned checkpoint.")
        import yaml

        try:
            with open(path, encoding="utf-8") as f:
                data = (yaml.safe_load(f) or {}) if path.endswith((".yaml", ".yml")) else json.load(f)
        except (json.JSONDecodeError, yaml.YAMLError, UnicodeDecodeError) as error:
            raise ValueError(
                f"{path!r} is not a valid PrunedConfig file ({error}): it was truncated or edited by hand. Fix it, or "
                "write it again with PrunedConfig(...).save_pretrained(dir)."
            ) from None
        if not isinstance(data, dict):
            raise ValueError(f"{path!r} must hold a mapping of PrunedConfig fields, got {type(data).__name__}.")
        return cls.from_dict(data)

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        os.makedirs(save_directory, exist_ok=True)
        self.to_json_file(os.path.join(save_directory, PRUNED_CONFIG_NAME))

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> "PrunedConfig":
        return cls.from_file(os.path.join(directory, PRUNED_CONFIG_NAME))
