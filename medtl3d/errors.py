"""Errors medtl3d raises for bad input: each names the offending thing and says what would be valid."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Iterator

_INTERFACE: ContextVar[str] = ContextVar("medtl3d_interface", default="python")


def interface() -> str:
    """Where the user drives medtl3d, so that advice names what they can type: ``"bundle"`` (the process is
    ``python -m monai.bundle``), ``"cli"`` (inside the ``medtl3d`` console script) or ``"python"``."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return "bundle" if getattr(spec, "name", None) == "monai.bundle.__main__" else _INTERFACE.get()


@contextmanager
def user_interface(kind: str) -> Iterator[None]:
    """Run a block as interface ``kind`` (the ``medtl3d`` CLI wraps its commands in ``user_interface("cli")``)."""
    token = _INTERFACE.set(kind)
    try:
        yield
    finally:
        _INTERFACE.reset(token)


def setting(name: str, value: Any) -> str:
    """How the user sets option ``name`` to ``value`` in their interface: ``--name value`` for a bundle id,
    ``--name-with-dashes value`` for a CLI flag, ``name=value`` for a Python argument."""
    kind = interface()
    if kind == "bundle":
        return f"--{name} {value}"
    if kind == "cli":
        return f"--{name.replace('_', '-')} {value}"
    return f"{name}={value!r}"


class Medtl3dError(Exception):
    """Base class of every error medtl3d raises on purpose."""


class UnknownBackboneError(Medtl3dError, ValueError):
    """A backbone name that is not registered, or a spatial dimension it does not support."""


class UnknownCutPointError(Medtl3dError, ValueError):
    """A cut point name (or index) that the backbone does not have."""


class StrategyNotApplicableError(Medtl3dError, ValueError):
    """A transfer-learning strategy, or a strategy argument, that does not apply to a backbone."""


class WeightsError(Medtl3dError, ValueError):
    """A weight file that cannot be read, or whose tensors do not fit the backbone."""


class UnsafeCheckpointError(WeightsError):
    """A checkpoint that would need arbitrary unpickling (torch.load(weights_only=False)) to read."""


class HubUnavailableError(Medtl3dError, RuntimeError):
    """Registered weights (e.g. ``imagenet``) that could not be fetched because no model hub is reachable."""


class CorruptDownloadError(WeightsError):
    """Registered weights whose download arrived damaged (hash mismatch, truncated or unreadable file)."""


class UnknownWeightsTagError(WeightsError):
    """Registered weights that name a hub tag (torchvision weights enum member, timm pretrained tag) that does not
    exist."""


class EfficiencyError(Medtl3dError, ValueError):
    """An efficiency report that cannot be made as asked: input too small, device missing, untraceable model."""


class DataError(Medtl3dError, ValueError):
    """An image, DICOM folder or datalist that cannot be used: names the file/row and what is wrong with it."""


class TrainingError(Medtl3dError, RuntimeError):
    """A training or evaluation run that cannot start or continue as configured (bad option, unusable checkpoint)."""


class AnalysisError(Medtl3dError, ValueError):
    """An analysis asked of unusable inputs: mismatched datapoints, too few datapoints, unknown layer, NaNs."""


class EvaluationError(Medtl3dError, ValueError):
    """Evaluated runs that cannot be reported or compared: different test cases, changed predictions, unpaired
    runs of two arms, a metric undefined on the cases."""


class CasesFailedError(Medtl3dError, RuntimeError):
    """Some cases of a folder inference failed or were skipped; every row, with its reason, was written."""


class SearchError(Medtl3dError, ValueError):
    """A cutoff search that cannot run as configured: no candidates, inapplicable strategy, foreign results store."""


class StudyError(SearchError):
    """A study that cannot run as configured: an empty or inapplicable grid, a bad option, a foreign results store."""


class OutputError(Medtl3dError, ValueError):
    """An output folder that cannot be written: a file stands at its path, or it cannot be created."""


class OutputLockedError(OutputError):
    """An output folder that another run (named in the message) is writing: one writer per output folder."""


def one_line(message: object, limit: int = 300) -> str:
    """The first non-empty line of ``message``, cut to ``limit`` characters: how a library's message (which may hold
    a traceback or a listing) is quoted inside one of ours."""
    line = next((text.strip() for text in str(message).splitlines() if text.strip()), "")
    return line if len(line) <= limit else line[: limit - 3] + "..."


class NoPretrainedWeightsWarning(UserWarning):
    """A transfer strategy built without pretrained weights: the kept units start random, nothing is transferred.
    Rebuilding a saved model (whose checkpoint holds the tensors) is not that, and silences it."""


def medtl3d_cause(error: BaseException | None) -> Medtl3dError | None:
    """The first error medtl3d raised on purpose in ``error``'s chain of causes: MONAI wraps the errors of
    transforms (``RuntimeError("applying transform ...")``, once per nested ``Compose`` / dataset), config
    expressions and components."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, Medtl3dError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None
