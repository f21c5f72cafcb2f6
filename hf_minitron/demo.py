"""`hf-minitron demo`: the main job on the embedded default (SmolLM2-135M-Instruct + the offline corpus)."""

import json
import time
from pathlib import Path

import torch


def run_demo(output: str = "outputs/demo", quick: bool = False) -> dict:
    """Prunes the embedded teacher by width with Minitron importance, then compares held-out LM loss of the teacher,
    the pruned student, and a student pruned with random channels (the baseline the importance must beat)."""
    from rich.console import Console
    from rich.table import Table
    from transformers import AutoModelForCausalLM

    from .checkpoint_pruning import PruneArguments, prune_checkpoint
    from .data import embedded_datasets
    from .depth import lm_loss
    from .embedded import load_default_teacher
    from .pruning_config import PrunedConfig

    console = Console()
    start = time.time()
    samples = 16 if quick else 128
    config = PrunedConfig(
        hidden_size=456,
        intermediate_size=1024,
        num_attention_heads=6,
        calibration_samples=samples,
        calibration_seq_length=128 if quick else 256,
    )
    pruned_dir = Path(output) / "pruned"
    summary = prune_checkpoint(PruneArguments(model="embedded", output=str(pruned_dir), overwrite=True), config)
    teacher, tokenizer = load_default_teacher()
    validation = embedded_datasets(tokenizer, seq_length=256)["validation"]
    validation = [
        {"input_ids": torch.tensor(r["input_ids"]), "attention_mask": torch.tensor(r["attention_mask"])}
        for r in validation.select(range(min(len(validation), 8 if quick else 32)))
    ]
    student = AutoModelForCausalLM.from_pretrained(pruned_dir)
    from .pruning import prune_model

    random_student = prune_model(
        teacher.__class__.from_pretrained(teacher.name_or_path),
        PrunedConfig(hidden_size=456, intermediate_size=1024, num_attention_heads=6, importance="random"),
    )
    results = {
        "teacher_loss": lm_loss(teacher, validation),
        "student_loss": lm_loss(student, validation),
        "random_selection_loss": lm_loss(random_student, validation),
        "teacher_parameters": summary["before"]["parameters"]["total"],
        "student_parameters": summary["after"]["parameters"]["total"],
        "seconds": None,
    }
    results["seconds"] = round(time.time() - start, 1)
    table = Table(title="Held-out LM loss on the offline corpus (no retraining yet)")
    for column in ("model", "parameters", "loss", "perplexity"):
        table.add_column(column)
    table.add_row(
        "teacher",
        f"{results['teacher_parameters']:,}",
        f"{results['teacher_loss']:.3f}",
        f"{torch.tensor(results['teacher_loss']).exp():.1f}",
    )
    for name, key in (
        ("pruned (Minitron importance)", "student_loss"),
        ("pruned (random channels)", "random_selection_loss"),
    ):
        table.add_row(
            name,
            f"{results['student_parameters']:,}",
            f"{results[key]:.3f}",
            f"{torch.tensor(results[key]).exp():.1f}",
        )
    console.print(table)
    (Path(output) / "demo_results.json").write_text(json.dumps(results, indent=2))
    console.print(
        f"Pruned checkpoint: {pruned_dir} (loads with AutoModelForCausalLM.from_pretrained). {results['seconds']} s"
    )
    return results
