"""hf-minitron: NVIDIA's Minitron recipe (structured pruning + knowledge distillation) on Hugging Face models.

Papers: "Compact Language Models via Pruning and Knowledge Distillation" (https://arxiv.org/abs/2407.14679) and
"LLM Pruning and Distillation in Practice: The Minitron Approach" (https://arxiv.org/abs/2408.11796).
"""

__version__ = "0.1.0.dev0"

from .alignment import (
    CHATML_TEMPLATE,
    RPOConfig,
    build_preference_dataset,
    build_sft_dataset,
    run_dpo,
    run_sft,
)
from .architectures import ARCHITECTURES, ArchitectureSpec, get_architecture
from .distillation_config import DistillationConfig
from .distillation_trainer import DistillationTrainer
from .evaluation import (
    compare_models,
    evaluate_model,
    format_comparison,
    heldout_perplexity,
    make_lm_eval_scorer,
    make_perplexity_scorer,
)
from .hub import push_to_hub
from .importance import ImportanceScores, estimate_importance, magnitude_importance, random_importance
from .losses import fused_kd_loss, intermediate_state_loss, kd_loss
from .model_card import PipelineSummary, render_model_card, save_model_card
from .pruning import PruningRecord, load_pruning_record, prune_model
from .pruning_config import PrunedConfig
from .search import SearchConfig, count_parameters, enumerate_candidates, search_architectures
from .search_results import SearchResult
from .teacher_cache import cache_teacher, load_teacher_cache
from .teacher_correction import TeacherCorrectionConfig, correct_teacher


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
