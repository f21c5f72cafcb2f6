"""The pages of `docs/` as a user reads them: each page's Python blocks run top to bottom as pasted, in one session of
their own (a page whose blocks need the teacher or data makes them in its first block), and its links resolve."""

import re
from pathlib import Path

import pytest
from test_readme import README, check_names_defined, check_teacher_never_pruned, python_blocks, run_blocks


DOCS = Path(__file__).parents[1] / "docs"
PAGES = sorted(DOCS.glob("*.md"))
PAGES_WITH_CODE = [page for page in PAGES if python_blocks(page)]


def _ids(pages):
    return [page.name for page in pages]


def test_docs_pages_exist_and_the_index_lists_them():
    index = (DOCS / "README.md").read_text(encoding="utf-8")
    assert len(PAGES) >= 10
    for page in PAGES:
        if page.name != "README.md":
            assert f"]({page.name})" in index, f"docs/README.md does not link {page.name}"


@pytest.mark.parametrize("page", [README, *PAGES], ids=["README.md (root)", *_ids(PAGES)])
def test_relative_links_resolve(page):
    text = page.read_text(encoding="utf-8")
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if "://" in target:
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        assert resolved.exists(), f"{page.name} links to {target}, which does not exist"
        if anchor and resolved.suffix == ".md":
            headings = re.findall(r"^#+ (.+)$", resolved.read_text(encoding="utf-8"), re.M)
            slugs = {re.sub(r"[^\w\- ]", "", h.lower()).strip().replace(" ", "-") for h in headings}
            assert anchor in slugs, f"{page.name} links to #{anchor}, which is no heading of {resolved.name}"


@pytest.mark.parametrize("page", PAGES_WITH_CODE, ids=_ids(PAGES_WITH_CODE))
def test_blocks_use_only_names_defined_before_them(page):
    """A fast check of what the slow test runs: names come from earlier blocks of the same page, never another's."""
    check_names_defined(page)
    check_teacher_never_pruned(page)


def test_families_page_lists_every_supported_family():
    from hf_minitron.architectures import ARCHITECTURES

    table = (DOCS / "families.md").read_text(encoding="utf-8")
    missing = [name for name in ARCHITECTURES if f"| `{name}` |" not in table]
    assert not missing, f"docs/families.md has no row for {missing}"


def test_lm_eval_is_shown_with_the_cpu_device():
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for command in re.findall(r"^lm_eval .*(?:\n    .*)*", text, re.M):
            assert "--device cpu" in command and "--include_path" in command, f"{page.name}: {command}"
        for call in re.findall(r"HFLM\([^)]*\)", text):
            assert 'device="cpu"' in call, f"{page.name}: {call}"


# What each page's blocks must have left behind, beyond running without an error.
def _distilled(namespace, out):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(out / "distilled").config.hidden_size == 456


def _pruned(namespace, out):
    return namespace["student"].config.num_hidden_layers == 24 and namespace["smaller"].config.intermediate_size == 768


EXPECTED = {
    "distillation.md": _distilled,
    "evaluation.md": lambda ns, out: 0.0 <= ns["results"]["results"]["pydoc_topics"]["acc,none"] <= 1.0,
    "families.md": lambda ns, out: ns["custom"].config.intermediate_size == 1024,
    "hybrids.md": lambda ns, out: ns["hybrid_student"].config.mamba_num_heads == 4,
    "moe.md": lambda ns, out: ns["moe_student"].config.num_experts == 6,
    "pruning.md": _pruned,
    "scale.md": lambda ns, out: ns["model"].config.intermediate_size == 768,
    "search.md": lambda ns, out: ns["result"].best is not None,
}


def test_every_page_with_code_has_an_expected_result():
    assert sorted(EXPECTED) == _ids(PAGES_WITH_CODE)


@pytest.mark.slow
@pytest.mark.parametrize("page", PAGES_WITH_CODE, ids=_ids(PAGES_WITH_CODE))
def test_docs_python_blocks_run_in_order(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = run_blocks(page)
    assert EXPECTED[page.name](namespace, tmp_path / "out")
    if "teacher" in namespace:  # the blocks pruned copies, never the teacher
        config = namespace["teacher"].config
        assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers) == (576, 1536, 30)
