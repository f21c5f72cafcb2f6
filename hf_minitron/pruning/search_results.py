"""What an architecture search measured: every candidate's metric per evaluated KD step, the rankings, when they
stabilised, and the reports (`search_results.json`, a markdown table, a PNG of loss against steps).

Kept apart from `search.py` so that a saved search can be loaded, re-ranked and plotted without the search itself.
"""

import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path

from ..io import atomic_file, atomic_write_text
from .config import PrunedConfig


RESULTS_NAME = "search_results"


def search_axes() -> tuple:
    """Every searched axis (`SearchAxis`), in the order of a candidate's name: each structure's `AXES`, in the order of
    the structures, then a hybrid's layers of each block type (`depth.BLOCK_TYPE_AXES`), its depth's other form."""
    from .structures import STRUCTURES, depth  # they import torch: loading a saved search does not need it

    axes = {axis.name: axis for structure in STRUCTURES for axis in structure.AXES}
    return (*axes.values(), *depth.BLOCK_TYPE_AXES)


def axes_of(shape: dict) -> tuple:
    """The searched axes (`SearchAxis`) of a candidate shape, those it has values of, in the order of its name."""
    return tuple(axis for axis in search_axes() if axis.name in shape)


@dataclass
class CandidateResult:
    """What the search measured for one candidate (step-keyed dicts use the evaluated KD steps).

    Attributes:
        name, pruned_config, shape, parameters (`{"total", "non_embedding", "memory"}`), budget_value: as in
            [`Candidate`].
        metric (`dict[int, float]`): the ranking metric (held-out loss, or the scorer's value) at each step.
        heldout_loss (`dict[int, float]`): held-out LM loss at each step (when an `eval_dataset` was given).
        train_loss (`dict[int, float]`): the KD training loss logged at each evaluated step.
        rank (`dict[int, int]`): 1-based rank at each step, among the candidates evaluated at that step.
        retrained (`bool`): whether the candidate was retrained (see `SearchConfig.retrain_top_k`).
        seconds (`float`): wall time spent on the candidate (pruning, retraining and evaluation).
    """

    name: str
    pruned_config: PrunedConfig
    shape: dict
    parameters: dict
    budget_value: int
    metric: dict[int, float] = field(default_factory=dict)
    heldout_loss: dict[int, float] = field(default_factory=dict)
    train_loss: dict[int, float] = field(default_factory=dict)
    rank: dict[int, int] = field(default_factory=dict)
    retrained: bool = False
    seconds: float = 0.0

    @property
    def num_parameters(self) -> int:
        return self.parameters["total"]

    def to_dict(self) -> dict:
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["pruned_config"] = self.pruned_config.to_dict()
        for key in ("metric", "heldout_loss", "train_loss", "rank"):
            data[key] = {str(step): value for step, value in sorted(data[key].items())}
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "CandidateResult":
        data = dict(data)
        data["pruned_config"] = PrunedConfig.from_dict(data["pruned_config"])
        for key in ("metric", "heldout_loss", "train_loss", "rank"):
            data[key] = {int(step): value for step, value in data.get(key, {}).items()}
        return cls(**data)


@dataclass
class SearchResult:
    """The candidates, their metric at every evaluated step, and the rankings.

    Attributes:
        candidates (`list[CandidateResult]`): in enumeration order (closest to the budget first).
        steps (`list[int]`): the evaluated KD steps.
        metric (`str`): `"heldout_loss"` or `"score"` (a user scorer).
        higher_is_better (`bool`): the direction of `metric`.
        count, target, tolerance: the budget (`target` in the unit of `count`).
        teacher (`dict`): the teacher's shape and parameter counts.
        config (`dict`): the `SearchConfig` used.
    """

    candidates: list[CandidateResult]
    steps: list[int]
    metric: str
    higher_is_better: bool
    count: str
    target: int
    tolerance: float
    teacher: dict
    config: dict

    def __post_init__(self):
        for step in self.steps:
            for rank, candidate in enumerate(self._sorted_at(step), start=1):
                candidate.rank[step] = rank

    def _sorted_at(self, step: int, among: list[CandidateResult] | None = None) -> list[CandidateResult]:
        pool = [c for c in (among if among is not None else self.candidates) if step in c.metric]
        sign = -1.0 if self.higher_is_better else 1.0
        return sorted(pool, key=lambda c: (sign * c.metric[step], c.name))

    def ranking(self, step: int | None = None) -> list[CandidateResult]:
        """The candidates evaluated at `step` (default: the last step), best first."""
        step = self.steps[-1] if step is None else step
        ranked = self._sorted_at(step)
        if not ranked:
            raise ValueError(f"No candidate was evaluated at step {step}: evaluated steps are {self.steps}.")
        return ranked

    @property
    def best(self) -> CandidateResult:
        """The best candidate at the last evaluated step."""
        return self.ranking()[0]

    def _complete(self) -> list[CandidateResult]:
        return [c for c in self.candidates if all(step in c.metric for step in self.steps)]

    def top_order(self, step: int, top_k: int | None = None) -> list[str]:
        """Names of the `top_k` best (default: `stability_top_k`) among the candidates evaluated at every step."""
        top_k = top_k or self.config.get("stability_top_k", 3)
        return [c.name for c in self._sorted_at(step, self._complete())[:top_k]]

    def stable_step(self, top_k: int | None = None) -> int | None:
        """The first evaluated step from which the order of the `top_k` best candidates never changes again.

        Candidates evaluated at every step are compared (the retrained ones). `None` when there are none.
        """
        if not self._complete():
            return None
        final = self.top_order(self.steps[-1], top_k)
        stable = self.steps[-1]
        for step in reversed(self.steps):
            if self.top_order(step, top_k) != final:
                break
            stable = step
        return stable

    def rank_correlation(self, step: int) -> float | None:
        """Spearman correlation between the ranking at `step` and the final one (candidates evaluated at both)."""
        both = [c for c in self.candidates if step in c.metric and self.steps[-1] in c.metric]
        if len(both) < 2:
            return None
        at_step = {c.name: i for i, c in enumerate(self._sorted_at(step, both))}
        final = {c.name: i for i, c in enumerate(self._sorted_at(self.steps[-1], both))}
        n = len(both)
        d2 = sum((at_step[name] - final[name]) ** 2 for name in at_step)
        return 1 - 6 * d2 / (n * (n * n - 1))

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict:
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "candidates"}
        data["stable_step"] = self.stable_step()
        data["candidates"] = [c.to_dict() for c in self.candidates]
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "SearchResult":
        data = {k: v for k, v in data.items() if k != "stable_step"}
        data["candidates"] = [CandidateResult.from_dict(c) for c in data["candidates"]]
        return cls(**data)

    def save(self, directory: str | os.PathLike) -> None:
        """Writes `search_results.json`, `search_results.md` and `search_results.png` (each file atomically)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write_text(directory / f"{RESULTS_NAME}.json", json.dumps(self.to_dict(), indent=1))
        atomic_write_text(directory / f"{RESULTS_NAME}.md", self.to_markdown())
        self.plot(directory / f"{RESULTS_NAME}.png")

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "SearchResult":
        path = Path(directory) / f"{RESULTS_NAME}.json"
        if not path.is_file():
            raise FileNotFoundError(f"No {path.name} in {str(directory)!r}: run search_architectures there first.")
        return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))

    # ------------------------------------------------------------------ reports
    def _metric_label(self) -> str:
        name = "held-out loss" if self.metric == "heldout_loss" else "score"
        return f"{name} ({'higher' if self.higher_is_better else 'lower'} is better)"

    def to_markdown(self) -> str:
        unit = "bytes of weights" if self.count == "memory" else f"{self.count.replace('_', '-')} parameters"
        final = self.steps[-1]
        lines = [
            f"## Architecture search: {len(self.candidates)} candidates within ±{self.tolerance:.0%} of "
            f"{self.target:,} {unit}",
            "",
            f"Teacher: {self.teacher['parameters']['total']:,} parameters. Ranked by {self._metric_label()} after "
            f"{final} KD steps; evaluated at steps {', '.join(map(str, self.steps))}.",
        ]
        stable = self.stable_step()
        if stable is not None and len(self.steps) > 1:
            top_k = min(self.config.get("stability_top_k", 3), len(self._complete()))
            lines.append(f"The order of the top {top_k} is stable from step {stable} on.")
        lines += ["", self._table(), ""]
        if len(self.steps) > 1:
            lines += ["| step | top order | Spearman vs final |", "|---|---|---|"]
            for step in self.steps:
                rho = self.rank_correlation(step)
                order = " > ".join(self.top_order(step))
                lines.append(f"| {step} | {order} | {'-' if rho is None else f'{rho:.2f}'} |")
            lines.append("")
        return "\n".join(lines).rstrip("\n") + "\n"

    def _table(self) -> str:
        axes = axes_of(self.candidates[0].shape) if self.candidates else ()  # none: `ranking` refuses below
        header = ["rank", "candidate", *(axis.column for axis in axes), "parameters"]
        if self.count != "total":
            header.append(self.count.replace("_", "-"))
        header += [f"step {step}" for step in self.steps]
        rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        ranked = self.ranking()
        rest = [c for c in self.ranking(self.steps[0]) if c not in ranked]
        for candidate in ranked + rest:
            rank = candidate.rank.get(self.steps[-1])
            cells = [str(rank) if rank else "-", candidate.name]
            cells += [str(candidate.shape[axis.name]) for axis in axes]
            cells.append(f"{candidate.num_parameters:,}")
            if self.count != "total":
                cells.append(f"{candidate.budget_value:,}")
            cells += [f"{candidate.metric[s]:.4f}" if s in candidate.metric else "-" for s in self.steps]
            rows.append("| " + " | ".join(cells) + " |")
        return "\n".join(rows)

    def plot(self, path: str | os.PathLike) -> None:
        """A PNG of every candidate's metric against the KD steps (a bar chart when nothing was retrained)."""
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator

        figure = Figure(figsize=(8, 5))
        axes = figure.subplots()
        best = self.best.name
        if len(self.steps) == 1:
            ranked = self.ranking()
            axes.barh([c.name for c in ranked][::-1], [c.metric[self.steps[0]] for c in ranked][::-1])
            axes.set_xlabel(self._metric_label())
        else:
            for candidate in self.candidates:
                steps = sorted(candidate.metric)
                axes.plot(
                    steps,
                    [candidate.metric[s] for s in steps],
                    marker="o",
                    linewidth=2.5 if candidate.name == best else 1.0,
                    label=candidate.name + (" (best)" if candidate.name == best else ""),
                )
            stable = self.stable_step()
            if stable is not None:
                axes.axvline(
                    stable, color="grey", linestyle="--", linewidth=1, label=f"ranking stable (step {stable})"
                )
            axes.set_xlabel("KD retraining steps")
            axes.xaxis.set_major_locator(MaxNLocator(integer=True))
            axes.set_ylabel(self._metric_label())
            axes.legend(fontsize=7)
        axes.set_title(
            f"Architecture search: {len(self.candidates)} candidates, target {self.target:,} ({self.count})"
        )
        figure.tight_layout()
        with atomic_file(path) as tmp:
            figure.savefig(tmp, dpi=120, format="png")
