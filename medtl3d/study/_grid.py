"""The study's grid: which arms (weights x strategy x cut) train, each on every fold x seed.

An arm is a search :class:`~medtl3d.search.Candidate` with one more axis, its weights: ``pretrained`` (the
bundle's ``weights``) or ``random``. The references are always there: WT (``full``, pretrained) and RI (``random``,
the same architecture from random init). Every truncated or slimmed variant (``truncate`` / ``transfusion`` at a
cut) gets, with ``random`` among the grid's weights, its random-init control of the *same* architecture
(``RI-truncate@layer2``), so a study separates "a smaller network" from "pretrained features". ``lwft`` and
``partial`` keep the full architecture, whose control is RI; ``stats`` (ST, Mean-Var) is itself a control of WT.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from ..errors import SearchError, StudyError
from ..search import SEARCH_STRATEGIES, SHORT_NAMES, Candidate, stage1_cuts

STUDY_STRATEGIES = ("full", "stats", *SEARCH_STRATEGIES)
WEIGHTS = ("pretrained", "random")
CONTROLLED = ("truncate", "transfusion")  # the strategies that change the architecture
NAMES = {**SHORT_NAMES, "full": "WT", "stats": "ST"}


@dataclass(frozen=True)
class Arm(Candidate):
    """One arm of the grid; ``control`` marks the random-init twin of a cut arm (its weights are ``null``)."""

    control: bool = False

    @property
    def label(self) -> str:
        return f"RI-{super().label}" if self.control else super().label

    @property
    def name(self) -> str:
        """The report's name: WT, RI, ST, TTL@layer2, RI control of TTL@layer2, ..."""
        base = NAMES[self.strategy] + ("" if self.cut is None else f"@{self.cut}")
        return f"RI control of {base}" if self.control else base


def check_grid(strategies: Sequence[str], weights: Sequence[str]) -> tuple[list[str], list[str]]:
    """Refuse a grid's unknown strategies and weights (the cuts need the backbone: :func:`expand_grid`); returns
    both without repeats."""
    strategies = list(dict.fromkeys(strategies))
    weights = list(dict.fromkeys(weights))
    for name in strategies:
        if name == "random":
            raise StudyError("study strategies: 'random' is not a strategy of the grid; RI and the controls come "
                             "from its weights: add 'random' to the study weights")
        if name not in STUDY_STRATEGIES:
            raise StudyError(f"study strategies: {name!r} is not one of {', '.join(STUDY_STRATEGIES)}")
    for name in weights:
        if name not in WEIGHTS:
            raise StudyError(f"study weights: {name!r} is not one of {', '.join(WEIGHTS)}")
    if "pretrained" not in weights:
        raise StudyError("study weights: the grid needs 'pretrained' (every claim compares transfer with a control)")
    return strategies, weights


def expand_grid(backbone, strategies: Sequence[str], cuts: str | Sequence[str],
                weights: Sequence[str]) -> list[Arm]:
    """The arms of a study: WT, RI when ``random`` is among ``weights``, then each strategy at each of its
    applicable ``cuts`` (:func:`medtl3d.search.stage1_cuts`), each truncated or slimmed arm followed by its
    random-init control."""
    strategies, weights = check_grid(strategies, weights)
    controls = "random" in weights
    arms = [Arm("full", None, 1)] + ([Arm("random", None, 1)] if controls else [])
    arms += [Arm(name, None, 1) for name in strategies if name == "stats"]
    for name in strategies:
        if name not in SEARCH_STRATEGIES:
            continue
        try:
            points = stage1_cuts(backbone, name, cuts)
        except SearchError as err:  # the search's one line, named after the study's option
            raise StudyError(f"study cuts: {str(err).removeprefix('search cuts: ')}") from None
        for point in points:
            arms.append(Arm(name, point.name, 1, point.unit, point.level))
            if controls and name in CONTROLLED:
                arms.append(Arm(name, point.name, 1, point.unit, point.level, control=True))
    return arms
