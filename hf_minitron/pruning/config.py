"""`PrunedConfig`: the target architecture and how importance is estimated.

Like a PEFT config, it is a plain dataclass that saves and loads as JSON next to the weights
(`pruned_config.json`), so a pruned checkpoint records how it was made.
"""

import json
import os
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


def target_fields() -> tuple[str, ...]:
    """The target sizes of `PrunedConfig`: every structure's `FIELDS`, in the order of `structures.STRUCTURES`."""
    from .structures import STRUCTURES  # the structures import torch: not when the command line only builds its help

    return tuple(dict.fromkeys(name for structure in STRUCTURES for name in structure.FIELDS))


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

    # The targets (every `int | None` field whose help says "target") are the structures' `FIELDS`, in the order of
    # `structures.STRUCTURES`: written out for the docstring, `--help` and IDE completion; a test keeps them equal.
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
        for name in target_fields():
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
        from .structures import STRUCTURES

        for structure in STRUCTURES:  # what each structure asks of its targets alone (e.g. head groups)
            structure.check_target(self)

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
        from .structures import STRUCTURES

        shape = model_shape(model_config)
        spec = ARCHITECTURES.get(model_config.model_type)
        # First whether each target applies to this model, then whether it is within the source's size, then what
        # each structure asks of its targets; each step walks the structures in order, and the first error is raised.
        for structure in STRUCTURES:
            structure.check_applies(self, model_config, shape, spec)
        for name in target_fields():
            target = getattr(self, name)
            if name in shape and target is not None and target > shape[name]:
                raise ValueError(
                    f"PrunedConfig.{name}={target} is larger than the source model's {name}={shape[name]}: pruning "
                    f"only removes structure. Use a value <= {shape[name]}, or None to keep it."
                )
        for structure in STRUCTURES:
            structure.check_target(self, model_config, shape)

    def resolve(self, model_config) -> dict:
        """The full target shape (source values filled in), after `validate_for`."""
        from ..architectures import model_shape

        self.validate_for(model_config)
        shape = model_shape(model_config)
        names = [name for name in target_fields() if name in shape]
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
