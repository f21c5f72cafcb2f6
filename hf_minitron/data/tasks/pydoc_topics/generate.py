"""Builds `pydoc_topics.jsonl`, the offline multiple-choice task shipped with hf-minitron.

Each item is a prose paragraph of the Python language reference (`pydoc_data.topics`, shipped with CPython) and four
section titles; the model must pick the section the paragraph comes from. The opening paragraph of a section, which
usually restates its title, is skipped, so the answer has to be inferred from the content.

The build is deterministic (sorted topics, a seeded RNG for distractors, answer positions and item order). `pydoc_data` changes
between Python versions, so the committed jsonl is the reference; regenerate it only on purpose:

    python hf_minitron/data/tasks/pydoc_topics/generate.py
"""

import json
import random
import re
import sys
from pathlib import Path


OUTPUT = Path(__file__).with_name("pydoc_topics.jsonl")
PARAGRAPHS_PER_TOPIC = 3
MIN_CHARS, MAX_CHARS = 120, 600
NUM_CHOICES = 4
SEED = 1234


def _title_and_paragraphs(text: str) -> tuple[str, list[str]]:
    lines = text.strip().splitlines()
    title = lines[0].strip()
    paragraphs, current = [], []
    for line in lines[2:] + [""]:  # lines[1] underlines the title
        # Indented lines are grammar rules, code, notes and list continuations: keep only flush-left prose.
        if line.strip() and not line.startswith(" "):
            current.append(line.strip())
        elif current:
            paragraphs.append(" ".join(current))
            current = []
    return title, paragraphs


def _is_prose(paragraph: str) -> bool:
    return (
        MIN_CHARS <= len(paragraph) <= MAX_CHARS
        and paragraph[0].isupper()
        and not paragraph.endswith(":")  # an introduction to a code block that was dropped
        and not re.match(r"(Changed|New|Deprecated) in version", paragraph)
        and not re.match(r"\d+\. ", paragraph)
    )


def build_items() -> list[dict]:
    """The task items, in a deterministic order."""
    import pydoc_data.topics

    sections: dict[str, list[str]] = {}
    for name in sorted(pydoc_data.topics.topics):
        title, paragraphs = _title_and_paragraphs(pydoc_data.topics.topics[name])
        if title in sections:  # "if" and "else" share one section
            continue
        sections[title] = [p for p in paragraphs[1:] if _is_prose(p)][:PARAGRAPHS_PER_TOPIC]
    titles = sorted(sections)
    rng = random.Random(SEED)
    items = []
    for title in titles:
        for passage in sections[title]:
            distractors = rng.sample([t for t in titles if t != title], NUM_CHOICES - 1)
            label = rng.randrange(NUM_CHOICES)
            choices = distractors[:label] + [title] + distractors[label:]
            items.append({"passage": passage, "choices": choices, "label": label})
    # Shuffled so that the first documents, which lm-eval's `limit` keeps, sample every section.
    rng.shuffle(items)
    return [{"id": i, **item} for i, item in enumerate(items)]


def main() -> None:
    items = build_items()
    with open(OUTPUT, "w", encoding="utf-8") as f:
        for item in items:
            f.write(json.dumps(item, ensure_ascii=False) + "\n")
    print(f"Wrote {len(items)} items to {OUTPUT} (Python {sys.version.split()[0]}).")


if __name__ == "__main__":
    main()
