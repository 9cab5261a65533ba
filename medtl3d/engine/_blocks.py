"""Small shared pieces of a training run: the rank, the history file, JSON-safe results and the resume check."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import torch.distributed as dist

from ..errors import TrainingError, interface
from ..reporting import write_text

ID_KEY = "id"
# options that may change when a run is resumed; every other option must match the checkpoint's
_RESUMABLE_CHANGES = ("epochs", "early_stop_patience", "device", "num_workers", "progress", "tensorboard",
                      "mlflow_uri", "num_threads")


def _rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the initialised default process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _write_history(history: list[dict], path: Path) -> None:
    columns: list[str] = []
    for row in history:
        columns.extend(k for k in row if k not in columns)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(history)
    write_text(path, buffer.getvalue())


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return str(value) if isinstance(value, Path) else value


def _resume_check(saved: dict, current: dict, path: Path) -> None:
    diffs = [f"{k}: {saved.get(k)!r} (checkpoint) vs {current.get(k)!r}" for k in sorted(set(saved) | set(current))
             if k not in _RESUMABLE_CHANGES and saved.get(k) != current.get(k)]
    if diffs:
        # a bundle has no resume id: its user starts over in another folder (or removes the old run's checkpoint)
        fix = (f"use another --output_dir, or delete {path} to start over" if interface() == "bundle" else
               "pass resume=False to start over, or use another output_dir")
        raise TrainingError(f"{path} was written by a different run ({'; '.join(diffs)}); {fix}")
