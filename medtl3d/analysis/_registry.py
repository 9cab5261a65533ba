"""One registry of analyses per family; every analysis of a family has that family's signature.

==============  ==============================================================================================
family          signature
==============  ==============================================================================================
``similarity``  ``fn(x, y, **options) -> float``: two activation sets with the same datapoints (first axis)
``probe``       ``fn(train_x, train_y, test_x, test_y, **options) -> dict`` of metrics
``weights``     ``fn(initial_state, final_state, model, **options) -> list[dict]`` one row per layer
``predictions`` ``fn(...) -> dict`` comparisons of trained models' predictions
``attribution`` ``fn(model, image, **options) -> Tensor`` saliency map shaped like the image
==============  ==============================================================================================
"""

from __future__ import annotations

from typing import Callable

from ..errors import AnalysisError

FAMILIES = ("similarity", "probe", "weights", "predictions", "attribution")
_REGISTRY: dict[str, dict[str, Callable]] = {family: {} for family in FAMILIES}


def register_analysis(family: str, name: str) -> Callable[[Callable], Callable]:
    """Decorator: register ``fn`` under ``family/name``."""
    if family not in _REGISTRY:
        raise AnalysisError(f"unknown analysis family {family!r}; families: {', '.join(FAMILIES)}")

    def add(fn: Callable) -> Callable:
        if name in _REGISTRY[family]:
            raise AnalysisError(f"analysis {family}/{name} is registered twice")
        _REGISTRY[family][name] = fn
        return fn

    return add


def get_analysis(family: str, name: str) -> Callable:
    """The analysis registered as ``family/name``; unknown names list what exists."""
    if family not in _REGISTRY:
        raise AnalysisError(f"unknown analysis family {family!r}; families: {', '.join(FAMILIES)}")
    if name not in _REGISTRY[family]:
        raise AnalysisError(
            f"unknown {family} analysis {name!r}; available: {', '.join(sorted(_REGISTRY[family])) or 'none'}"
        )
    return _REGISTRY[family][name]


def list_analyses(family: str | None = None) -> dict[str, list[str]]:
    """Registered analysis names by family."""
    families = FAMILIES if family is None else (family,)
    return {f: sorted(_REGISTRY[f]) for f in families}
