"""Which candidates a hierarchical cutoff search trains: Stage 1 block cut points, Stage 2 their layer neighbourhood.

Cut points are compared by *unit* (the index of the last backbone unit kept): two names at the same unit (e.g.
ResNet's ``layer1`` block cut and its last ``layer1.1`` layer cut) are one model for every cut strategy, so each
unit is trained once per strategy, under its block name where it has one. The blocks of a backbone partition its units: block ``j`` holds the units after
block cut ``j-1`` up to block cut ``j``. The Stage 2 neighbourhood of the best block cut ``i`` with width ``n`` is
every cut point inside blocks ``i-n+1 .. i+n`` (clipped to the backbone), i.e. for ``n=1`` the block that ends at
the cut and the block that starts after it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from ..backbones import Backbone, CutPoint
from ..errors import SearchError, UnknownCutPointError

SEARCH_STRATEGIES = ("truncate", "transfusion", "lwft", "partial")
REFERENCES = ("full", "random", "linear_probe")
SHORT_NAMES = {"truncate": "TTL", "transfusion": "TF", "lwft": "LWFT", "partial": "PTL", "full": "FTL",
               "random": "RI", "linear_probe": "LP"}


@dataclass(frozen=True)
class Candidate:
    """One model to train: a strategy, its cut point (None for references) and the stage that asked for it."""

    strategy: str
    cut: str | None
    stage: int
    unit: int | None = None
    level: str | None = None

    @property
    def label(self) -> str:
        return self.strategy if self.cut is None else f"{self.strategy}@{self.cut}"


def _by_unit_block_first(cut: CutPoint) -> tuple[int, bool]:
    return cut.unit, cut.level != "block"


def applicable_cuts(backbone: Backbone, strategy: str, cuts: Sequence[CutPoint]) -> list[CutPoint]:
    """``cuts`` deduplicated by unit (first name wins), minus the last unit for ``truncate`` (the whole backbone:
    the FTL reference, which every search trains) and for ``transfusion`` (nothing left above it to slim)."""
    last = len(backbone.units) - 1
    seen: set[int] = set()
    kept = []
    for cut in cuts:
        if cut.unit in seen or (strategy in ("truncate", "transfusion") and cut.unit == last):
            continue
        seen.add(cut.unit)
        kept.append(cut)
    return kept


def stage1_cuts(backbone: Backbone, strategy: str, cuts: str | Sequence[str] = "block") -> list[CutPoint]:
    """Stage 1 cut points of ``strategy``: a level (``block``; ``all`` for an exhaustive search) or names."""
    try:
        points = (backbone.cut_points_at(cuts) if isinstance(cuts, str) else [backbone.cut_point(c) for c in cuts])
    except UnknownCutPointError as err:
        raise SearchError(f"search cuts: {err}") from None
    kept = applicable_cuts(backbone, strategy, sorted(points, key=_by_unit_block_first))
    if not kept:
        raise SearchError(f"strategy {strategy!r} has no cut point to search on {backbone.name} among "
                          f"{cuts if isinstance(cuts, str) else list(cuts)!r}")
    return kept


def neighbourhood(backbone: Backbone, best: str, width: int = 1) -> list[CutPoint]:
    """Every cut point (any level, deduplicated by unit) inside the ``width`` blocks on either side of cut point
    ``best``: blocks ``i-width+1 .. i+width`` where ``i`` is the block ending at (or containing) ``best``."""
    if width < 1:
        raise SearchError(f"search neighbourhood must be >= 1 block, got {width}")
    blocks = sorted({c.unit for c in backbone.cut_points_at("block")})
    unit = backbone.cut_point(best).unit
    i = next(j for j, end in enumerate(blocks) if end >= unit)
    low = blocks[i - width] if i - width >= 0 else -1  # exclusive
    high = blocks[min(i + width, len(blocks) - 1)]  # inclusive
    inside = [c for c in sorted(backbone.cut_points, key=_by_unit_block_first) if low < c.unit <= high]
    seen: set[int] = set()
    return [c for c in inside if not (c.unit in seen or seen.add(c.unit))]


def stage2_cuts(backbone: Backbone, strategy: str, best: str, evaluated_units: set[int], width: int = 1) -> list[CutPoint]:
    """Stage 2 of ``strategy``: the neighbourhood of ``best`` minus the units Stage 1 already trained."""
    near = applicable_cuts(backbone, strategy, neighbourhood(backbone, best, width))
    return [c for c in near if c.unit not in evaluated_units]


def candidates_for(strategy: str, cuts: Sequence[CutPoint], stage: int) -> list[Candidate]:
    return [Candidate(strategy, c.name, stage, c.unit, c.level) for c in cuts]
