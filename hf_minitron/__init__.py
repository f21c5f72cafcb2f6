"""hf-minitron: NVIDIA's Minitron recipe (structured pruning + knowledge distillation) on Hugging Face models.

Papers: "Compact Language Models via Pruning and Knowledge Distillation" (https://arxiv.org/abs/2407.14679) and
"LLM Pruning and Distillation in Practice: The Minitron Approach" (https://arxiv.org/abs/2408.11796).
"""

__version__ = "0.1.0.dev0"

from .architectures import ARCHITECTURES, ArchitectureSpec, get_architecture
from .pruning_config import PrunedConfig


__all__ = [
    "ARCHITECTURES",
    "ArchitectureSpec",
    "PrunedConfig",
    "get_architecture",
]
