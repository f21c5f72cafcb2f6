"""hf-minitron: NVIDIA's Minitron recipe (structured pruning + knowledge distillation) on Hugging Face models.

Papers: "Compact Language Models via Pruning and Knowledge Distillation" (https://arxiv.org/abs/2407.14679) and
"LLM Pruning and Distillation in Practice: The Minitron Approach" (https://arxiv.org/abs/2408.11796).
"""

__version__ = "0.1.0.dev0"

import importlib


# The public names and the module of each. They are imported on first use (PEP 562), not here: `import hf_minitron`
# (and so `hf-minitron <command> --help`) must not pay for torch, transformers, peft and lm-eval before it needs them.
_EXPORTS = {
    "alignment": (
        "CHATML_TEMPLATE",
        "RPOConfig",
        "build_preference_dataset",
        "build_sft_dataset",
        "run_dpo",
        "run_sft",
    ),
    "architectures": ("ARCHITECTURES", "ArchitectureSpec", "get_architecture"),
    "distillation.config": ("DistillationConfig",),
    "distillation.trainer": ("DistillationTrainer",),
    "evaluation": (
        "compare_models",
        "evaluate_model",
        "format_comparison",
        "heldout_perplexity",
        "make_lm_eval_scorer",
        "make_perplexity_scorer",
    ),
    "hub": ("push_to_hub",),
    "pruning.importance": ("ImportanceScores", "estimate_importance", "magnitude_importance", "random_importance"),
    "distillation.losses": ("fused_kd_loss", "intermediate_state_loss", "kd_loss"),
    "model_card": ("PipelineSummary", "render_model_card", "save_model_card"),
    "pruning.prune": ("PruningRecord", "load_pruning_record", "prune_model"),
    "pruning.config": ("PrunedConfig",),
    "pruning.search": ("search_architectures",),
    "pruning.search_config": ("SearchConfig",),
    "pruning.candidates": ("enumerate_candidates",),
    "pruning.parameter_count": ("count_parameters",),
    "pruning.search_results": ("SearchResult",),
    "distillation.teacher_cache": ("cache_teacher", "load_teacher_cache"),
    "distillation.teacher_correction": ("TeacherCorrectionConfig", "correct_teacher"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}


def __getattr__(name):
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_MODULE_OF[name]}", __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__():
    return sorted(set(globals()) | set(_MODULE_OF))


__all__ = [
    "ARCHITECTURES",
    "ArchitectureSpec",
    "CHATML_TEMPLATE",
    "DistillationConfig",
    "DistillationTrainer",
    "ImportanceScores",
    "PipelineSummary",
    "PrunedConfig",
    "PruningRecord",
    "RPOConfig",
    "SearchConfig",
    "SearchResult",
    "TeacherCorrectionConfig",
    "build_preference_dataset",
    "build_sft_dataset",
    "cache_teacher",
    "compare_models",
    "count_parameters",
    "correct_teacher",
    "enumerate_candidates",
    "estimate_importance",
    "evaluate_model",
    "format_comparison",
    "fused_kd_loss",
    "get_architecture",
    "heldout_perplexity",
    "intermediate_state_loss",
    "kd_loss",
    "load_pruning_record",
    "load_teacher_cache",
    "magnitude_importance",
    "make_lm_eval_scorer",
    "make_perplexity_scorer",
    "prune_model",
    "push_to_hub",
    "random_importance",
    "render_model_card",
    "run_dpo",
    "run_sft",
    "save_model_card",
    "search_architectures",
]
