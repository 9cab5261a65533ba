"""What a training or evaluation run returns, and where a bundle model's settings live."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

# what a bundle's model.pt keeps of the best checkpoint (no optimizer state)
BUNDLE_CHECKPOINT_KEYS = ("format", "model", "initial_state", "model_config", "key_metric", "best_metric", "best_epoch",
                          "history", "run_config", "provenance")


@dataclass
class TrainResult:
    """What a training run produced (``best_metric`` is nan when no validation had a defined key metric)."""

    best_metric: float
    best_epoch: int
    key_metric: str
    history: list[dict] = field(default_factory=list)
    best_checkpoint: Path | None = None
    last_checkpoint: Path | None = None
    epochs_run: int = 0
    select: str = "key_metric"


@dataclass
class EvalResult:
    """Metrics of an evaluation and one prediction row per case (per series with ``series_key``)."""

    metrics: dict[str, float]
    predictions: list[dict]


def settings_path(ckpt_path: str | Path) -> Path:
    """The JSON next to a checkpoint (``model.pt`` / its ``model.ts`` export) that records its preprocessing."""
    return Path(ckpt_path).with_suffix(".json")
