import re

import pytest
import yaml
from conftest import tiny_model

from hf_minitron.model_card import (
    TEMPLATE_PATH,
    PipelineSummary,
    loss_panels,
    plot_loss_curves,
    render_model_card,
    save_model_card,
)


TEACHER = "HuggingFaceTB/SmolLM2-135M-Instruct"
STUDENT = "someone/smollm2-minitron-90m"


def comparison():
    def model(name, params, acc, ppl):
        result = {"metrics": {"acc": acc, "acc_norm": acc - 0.01}, "stderr": {}, "primary_metric": "acc"}
        result.update(num_fewshot=5, num_samples=143)
        return {
            "name": name,
            "num_parameters": params,
            "results": {"pydoc_topics": result},
            "heldout": {"loss": 2.0, "perplexity": ppl, "num_tokens": 4096},
        }

    return {
        "tasks": {"pydoc_topics": {"metric": "acc", "num_fewshot": 5, "num_samples": 143}},
        "models": {
            "teacher": model(TEACHER, 134515008, 0.4126, 12.345),
            "student": model(STUDENT, 90123456, 0.3776, 15.5),
        },
    }


def full_summary():
    return PipelineSummary(
        model_name=STUDENT,
        teacher_id=TEACHER,
        license="apache-2.0",
        datasets=["HuggingFaceFW/fineweb-edu"],
        teacher_config={
            "num_hidden_layers": 30,
            "hidden_size": 576,
            "intermediate_size": 1536,
            "num_attention_heads": 9,
        },
        student_config={
            "num_hidden_layers": 26,
            "hidden_size": 512,
            "intermediate_size": 1024,
            "num_attention_heads": 6,
        },
        pruned_config={
            "importance": "activation",
            "sequence_aggregation": "mean",
            "batch_aggregation": "l2",
            "calibration_samples": 1024,
            "calibration_seq_length": 512,
            "depth_method": "contiguous",
        },
        teacher_parameters=134515008,
        student_parameters=90123456,
        layer_importance=[0.5 + 0.1 * i for i in range(30)],
        dropped_layers=[21, 22, 23, 24],
        teacher_correction={"dataset": "fineweb-edu", "tokens": 12345678},
        distillation={"loss": "forward_kl", "temperature": 1.0, "tokens": 987654321, "max_steps": 321},
        log_history=[{"step": s, "loss": 3.0 / s, "kd_loss": 2.0 / s} for s in range(1, 6)]
        + [{"step": 5, "train_loss": 1.0}],
        evaluation=comparison(),
        alignment={"method": "sft", "dataset": "HuggingFaceTB/smoltalk"},
    )


def front_matter(text):
    match = re.match(r"^---\n(.*?)\n---\n", text, re.S)
    assert match, "the card must start with YAML front matter"
    return yaml.safe_load(match[1]), text[match.end() :]


def test_packaged_template_matches_user_facing_copy():
    from pathlib import Path

    user_facing = Path(__file__).parents[1] / "model_cards" / "minitron_card.md.j2"
    assert TEMPLATE_PATH.read_text() == user_facing.read_text()


def test_full_card(tmp_path):
    path = save_model_card(full_summary(), tmp_path / "final")
    text = path.read_text()
    meta, body = front_matter(text)
    assert meta["base_model"] == TEACHER
    assert meta["library_name"] == "transformers"
    assert meta["license"] == "apache-2.0"
    assert meta["datasets"] == ["HuggingFaceFW/fineweb-edu"]
    assert set(meta["tags"]) >= {"minitron", "pruning", "distillation", "hf-minitron"}
    (index,) = meta["model-index"]
    assert index["name"] == STUDENT
    task_result, ppl_result = index["results"]
    assert task_result["dataset"]["name"] == "pydoc_topics"
    assert task_result["dataset"]["args"] == {"num_few_shot": 5}
    assert task_result["metrics"][0]["type"] == "acc" and task_result["metrics"][0]["value"] == 0.3776
    assert ppl_result["metrics"][0] == {"type": "perplexity", "value": 15.5}

    # Pruning table: every axis with before/after, and parameter counts.
    assert "| Layers (depth) | 30 | 26 | 87% |" in body
    assert "| Hidden size (embedding) | 576 | 512 | 89% |" in body
    assert "| MLP intermediate size | 1,536 | 1,024 | 67% |" in body
    assert "| Attention heads | 9 | 6 | 67% |" in body
    assert "| Parameters | 134,515,008 | 90,123,456 | 67.0% |" in body
    assert "| Aggregation (sequence, batch) | mean, l2 |" in body
    assert "| Calibration | 1,024 samples × 512 tokens |" in body
    assert "removed layers 21, 22, 23, 24 (0-based)" in body and "contiguous block" in body
    # Teacher correction, distillation and alignment settings.
    assert "| tokens | 12,345,678 |" in body
    assert "| loss | forward_kl |" in body and "| tokens | 987,654,321 |" in body and "| max_steps | 321 |" in body
    assert "### Alignment" in body and "| dataset | HuggingFaceTB/smoltalk |" in body
    # Evaluation table, teacher vs student.
    assert "| pydoc_topics (n=143) | acc | 5 | 0.4126 | 0.3776 | -0.0350 |" in body
    assert "| held-out (n=4096 tokens) | perplexity ↓ | - | 12.345 | 15.500 | +3.155 |" in body
    # Plots next to the card, referenced by relative path.
    for name in ("layer_importance.png", "loss_curves.png"):
        assert (path.parent / name).read_bytes().startswith(b"\x89PNG")
        assert f"]({name})" in body
    assert f'model_id = "{STUDENT}"' in body and "AutoModelForCausalLM.from_pretrained(model_id)" in body
    assert "@article{muralidharan2024compact" in body and "arXiv:2407.14679" in body
    assert "@article{sreenivas2024llm" in body and "arXiv:2408.11796" in body
    assert "\n\n\n" not in text
    assert sorted(p.name for p in path.parent.iterdir()) == ["README.md", "layer_importance.png", "loss_curves.png"]


def test_empty_summary_renders_only_the_basics(tmp_path):
    path = save_model_card(PipelineSummary(), tmp_path)
    meta, body = front_matter(path.read_text())
    assert meta["library_name"] == "transformers" and "minitron" in meta["tags"]
    for key in ("base_model", "license", "datasets", "model-index"):
        assert key not in meta
    for section in (
        "## How it was made",
        "### Teacher correction",
        "### Pruning",
        "### Distillation",
        "### Alignment",
        "## Evaluation",
        "![",
    ):
        assert section not in body
    assert "## Quick start" in body and "## Citation" in body
    assert [p.name for p in tmp_path.iterdir()] == ["README.md"]


@pytest.mark.parametrize(
    "given, present, absent",
    [
        ({"distillation": {"loss": "forward_kl"}}, ["### Distillation"], ["### Pruning", "## Evaluation", "!["]),
        (
            {"layer_importance": [1.0, 2.0], "dropped_layers": [1]},
            ["### Pruning", "![Layer importance]"],
            ["### Distillation"],
        ),
        ({"layer_importance": [1.0, 2.0]}, [], ["![Layer importance]"]),  # depth not pruned: nothing to show
        ({"log_history": [{"step": 1, "loss": 1.0}]}, ["### Distillation", "![Training losses]"], ["### Pruning"]),
        ({"evaluation": comparison()}, ["## Evaluation"], ["### Pruning", "### Distillation"]),
    ],
)
def test_sections_follow_the_data(tmp_path, given, present, absent):
    body = front_matter(save_model_card(PipelineSummary(**given), tmp_path).read_text())[1]
    for text in present:
        assert text in body
    for text in absent:
        assert text not in body


def test_summary_accepts_config_objects():
    from hf_minitron import PrunedConfig

    model = tiny_model("llama")
    summary = PipelineSummary(
        teacher_config=model.config, student_config=model.config, pruned_config=PrunedConfig(num_hidden_layers=2)
    )
    assert summary.teacher_config["hidden_size"] == 32
    assert summary.pruned_config["num_hidden_layers"] == 2
    body = str(render_model_card(summary))
    assert "| Hidden size (embedding) | 32 | 32 | 100% |" in body
    with pytest.raises(ValueError, match="layer_importance"):
        PipelineSummary(layer_importance=[])


def test_loss_plot_needs_a_loss(tmp_path):
    assert not plot_loss_curves([{"step": 1, "learning_rate": 1e-4}], tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_card_only_on_main_process(tmp_path, monkeypatch):
    from accelerate import PartialState

    monkeypatch.setattr(PartialState, "is_main_process", property(lambda self: False))
    assert save_model_card(full_summary(), tmp_path / "card") is None
    assert not (tmp_path / "card").exists()


def test_card_names_the_model_and_links_only_what_exists(tmp_path):
    """Titled with the model, quick start from a real place, the teacher by its name, no invented links."""
    summary = PipelineSummary(
        model_name="SmolLM2-135M-Instruct-Minitron-80M",
        model_id=str(tmp_path / "final"),
        teacher_name="/data/my-teacher",
        evaluation=comparison(),
    )
    body = front_matter(save_model_card(summary, tmp_path / "final").read_text())[1]
    assert body.startswith("\n# SmolLM2-135M-Instruct-Minitron-80M\n")
    assert f'model_id = "{tmp_path / "final"}"' in body
    assert "compressed version of `/data/my-teacher`" in body
    links = re.findall(r"\]\((https?://[^)]+)\)", body)
    assert links and all(
        link.startswith(("https://arxiv.org/", "https://huggingface.co/", "https://github.com/EleutherAI/"))
        for link in links
    ), links
    # With a Hub teacher, its page is the link (it exists); the student's Hub id is the quick start.
    body = str(render_model_card(PipelineSummary(model_name=STUDENT, teacher_id=TEACHER)))
    assert f"[{TEACHER}](https://huggingface.co/{TEACHER})" in body and f'model_id = "{STUDENT}"' in body


def test_pruning_plots_show_what_was_pruned(tmp_path):
    summary = PipelineSummary(
        head_importance=[[0.1 * (h + 1) + 0.01 * layer for h in range(4)] for layer in range(3)],
        kept_heads={"0": [1, 3], "1": [2, 3], "2": [0, 3]},
        neuron_importance=[[1.0 / (n + 1) + layer for n in range(16)] for layer in range(3)],
        kept_neurons=12,
        hidden_importance=[1.0 / (c + 1) for c in range(8)],
        kept_hidden=6,
        layer_importance=[0.3, 0.1, 0.5],
    )
    path = save_model_card(summary, tmp_path)
    body = path.read_text()
    for name in ("head_importance.png", "mlp_importance.png", "embedding_importance.png"):
        assert (tmp_path / name).read_bytes().startswith(b"\x89PNG") and f"]({name})" in body
    assert "kept heads marked" in body and "with the cut-off" in body
    assert not (tmp_path / "layer_importance.png").exists()  # no layer was dropped


def test_loss_curves_separate_kd_from_cross_entropy():
    history = [
        {"step": s, "loss": 2.0 / s, "kd_loss": 2.0 / s * (1 + 1e-7), "ce_loss": 5.0 - s, "grad_norm": 1.0}
        for s in range(1, 5)
    ]
    history += [{"step": 2, "eval_loss": 4.5, "eval_kd_loss": 1.1}, {"step": 4, "eval_loss": 4.0, "eval_kd_loss": 0.6}]
    history += [{"step": 4, "train_loss": 1.0}]
    panels = loss_panels(history)
    kd, ce = panels["Distillation loss (KL to the teacher)"], panels["Cross-entropy on the data (nats/token)"]
    assert list(kd) == ["kd_loss", "eval_kd_loss"]  # `loss` is the KD loss here: one curve, not two on top
    assert list(ce) == ["ce_loss", "eval_loss"] and ce["eval_loss"] == ([2, 4], [4.5, 4.0])
    assert "Other loss terms" not in panels
    with_ce = [{**entry, "loss": entry["loss"] + 1} for entry in history if "loss" in entry]
    assert list(loss_panels(with_ce)["Distillation loss (KL to the teacher)"]) == ["loss", "kd_loss"]
    assert list(loss_panels([{"step": 1, "is_loss": 0.5}])) == ["Other loss terms"]


@pytest.mark.parametrize(
    "pruned, says",
    [
        ({"depth_method": "contiguous"}, "raises the LM loss least"),
        ({"depth_method": "contiguous", "contiguous_score": "block_influence"}, "lowest block influence"),
        ({"depth_method": "contiguous", "depth_scorer": "winogrande"}, "scored best on winogrande"),
        ({"depth_method": "block_influence"}, "the layers with the lowest block influence"),
    ],
)
def test_card_says_how_the_dropped_layers_were_chosen(tmp_path, pruned, says):
    summary = PipelineSummary(pruned_config=pruned, dropped_layers=[3, 4])
    body = front_matter(save_model_card(summary, tmp_path).read_text())[1]
    assert "removed layers 3, 4" in body and says in body


def test_a_short_distillation_is_called_a_smoke_test_and_every_card_has_limitations(tmp_path):
    import dataclasses

    long_run = save_model_card(full_summary(), tmp_path / "long").read_text()
    assert "## Limitations" in long_run and "smoke test" not in long_run
    short = dataclasses.replace(full_summary(), distillation={"loss": "forward_kl", "tokens": 20480, "max_steps": 40})
    text = save_model_card(short, tmp_path / "short").read_text()
    assert "**A smoke test, not a model to use.** It was distilled on 20,480 tokens" in text


def test_quick_start_names_no_local_path(tmp_path):
    import dataclasses

    text = save_model_card(
        dataclasses.replace(full_summary(), model_name="Tiny-Minitron-1M"), tmp_path / "f"
    ).read_text()
    assert 'model_id = "<namespace>/Tiny-Minitron-1M"' in text and str(tmp_path) not in text


def _pruning_table(teacher, student) -> list[str]:
    card = str(render_model_card(PipelineSummary(teacher_config=teacher, student_config=student)))
    return [line for line in card.splitlines() if line.startswith("| ") and line.count("|") == 5]


def test_card_names_the_experts_width_of_a_family_whose_intermediate_size_is_it():
    """Mixtral's `intermediate_size` is each expert's width: it has no dense MLP to call it the MLP's."""
    from hf_minitron.pruning.summary import shape_summary

    teacher, student = tiny_model("mixtral"), tiny_model("mixtral", intermediate_size=16, num_local_experts=2)
    table = _pruning_table(teacher.config, student.config)
    assert "| Expert FFN width | 24 | 16 | 67% |" in table and "| Routed experts | 4 | 2 | 50% |" in table
    assert not any("MLP intermediate size" in line for line in table)
    # The pipeline's card is built from shape summaries (`hf-minitron run`): the same rows.
    pipeline = [{k: v for k, v in shape_summary(m).items() if k != "parameters"} for m in (teacher, student)]
    assert _pruning_table(*pipeline) == table[:-1]  # but the vocabulary, which a shape summary does not hold


def test_card_of_a_dense_family_names_the_mlp_width():
    import copy

    teacher = tiny_model("llama").config
    student = copy.deepcopy(teacher)
    student.intermediate_size = 48
    table = _pruning_table(teacher, student)
    assert "| MLP intermediate size | 64 | 48 | 75% |" in table
    assert not any("Expert" in line or "Routed" in line for line in table)


def test_card_of_llama4_tells_its_dense_mlp_from_its_experts():
    """Llama 4's `intermediate_size` is its experts' (and shared expert's) width, `intermediate_size_mlp` its dense
    layers'; depth pruning of interleaved layers keeps some of each type."""
    from hf_minitron import PrunedConfig, prune_model

    teacher = tiny_model("llama4_text", interleave_moe_layer_step=2)  # layers 1 and 3 MoE, 0 and 2 dense
    teacher_config = teacher.config.to_dict()
    student = prune_model(teacher, PrunedConfig(layers_to_drop=[0]), show_progress=False)
    table = _pruning_table(teacher_config, student.config)
    assert table[1:5] == [
        "| Layers (depth) | 4 | 3 | 75% |",
        "| MLP layers | 2 | 1 | 50% |",
        "| MoE layers | 2 | 2 | 100% |",
        "| Hidden size (embedding) | 32 | 32 | 100% |",
    ]
    assert "| MLP intermediate size | 40 | 40 | 100% |" in table and "| Expert FFN width | 24 | 24 | 100% |" in table
    assert "| Shared-expert width | 24 | 24 | 100% |" in table


def test_card_counts_deepseek_v3_dense_and_moe_layers_after_depth_pruning():
    from hf_minitron import PrunedConfig, prune_model

    teacher = tiny_model("deepseek_v3")  # layer 0 dense (first_k_dense_replace=1), layers 1-3 MoE
    teacher_config = teacher.config.to_dict()
    student = prune_model(teacher, PrunedConfig(layers_to_drop=[2]), show_progress=False)
    table = _pruning_table(teacher_config, student.config)
    assert table[1:4] == [
        "| Layers (depth) | 4 | 3 | 75% |",
        "| MLP layers | 1 | 1 | 100% |",
        "| MoE layers | 3 | 2 | 67% |",
    ]
    assert "| MLP intermediate size | 64 | 64 | 100% |" in table and "| Expert FFN width | 24 | 24 | 100% |" in table
