"""Errors medtl3d raises for bad input: each names the offending thing and says what would be valid."""

from __future__ import annotations


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


class EfficiencyError(Medtl3dError, ValueError):
    """An efficiency report that cannot be made as asked: input too small, device missing, untraceable model."""


class DataError(Medtl3dError, ValueError):
    """An image, DICOM folder or datalist that cannot be used: names the file/row and what is wrong with it."""


class TrainingError(Medtl3dError, RuntimeError):
    """A training or evaluation run that cannot start or continue as configured (bad option, unusable checkpoint)."""


class AnalysisError(Medtl3dError, ValueError):
    """An analysis asked of unusable inputs: mismatched datapoints, too few datapoints, unknown layer, NaNs."""


class SearchError(Medtl3dError, ValueError):
    """A cutoff search that cannot run as configured: no candidates, inapplicable strategy, foreign results store."""


class OutputLockedError(Medtl3dError, RuntimeError):
    """An output folder another run is writing (one writer per folder): names the folder and the holder."""
