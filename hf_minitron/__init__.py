"""hf-minitron: NVIDIA's Minitron recipe (structured pruning + knowledge distillation) on Hugging Face models.

Papers: "Compact Language Models via Pruning and Knowledge Distillation" (https://arxiv.org/abs/2407.14679) and
"LLM Pruning and Distillation in Practice: The Minitron Approach" (https://arxiv.org/abs/2408.11796).
"""

__version__ = "0.1.0.dev0"

from .architectures import ARCHITECTURES, ArchitectureSpec, get_architecture
from .distillation_config import DistillationConfig
from .distillation_trainer import DistillationTrainer
from .importance import ImportanceScores, estimate_importance, magnitude_importance, random_importance
from .losses import fused_kd_loss, intermediate_state_loss, kd_loss
from .pruning import PruningRecord, load_pruning_record, prune_model
from .pruning_config import PrunedConfig
from .teacher_correction import TeacherCorrectionConfig, correct_teacher


__all__ = [
    "ARCHITECTURES",
    "ArchitectureSpec",
    "DistillationConfig",
    "DistillationTrainer",
    "ImportanceScores",
    "PrunedConfig",
    "PruningRecord",
    "TeacherCorrectionConfig",
    "correct_teacher",
    "estimate_importance",
    "fused_kd_loss",
    "get_architecture",
    "intermediate_state_loss",
    "kd_loss",
    "load_pruning_record",
    "magnitude_importance",
    "prune_model",
    "random_importance",
]
