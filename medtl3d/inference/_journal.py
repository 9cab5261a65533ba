"""The journal of a folder inference run: one file per finished case, so an interrupted run resumes without
predicting a case again, unless its files or the model and settings changed."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from ..reporting import write_json

logger = logging.getLogger("medtl3d.inference._folder")  # the journal's messages belong to the run

JOURNAL_DIR = ".medtl3d-run"


def _source_stamp(case) -> list:
    """(name, size, mtime) of the case's files (None, None for one that cannot be read): a journalled row is reused
    only while its files are unchanged."""
    stamp = []
    for name in map(str, case.files or (case.path,)):
        try:
            st = os.stat(name)
            stamp.append([name, st.st_size, st.st_mtime_ns])
        except OSError:
            stamp.append([name, None, None])
    return stamp


def _model_digest(model: nn.Module) -> str:
    """SHA-256 of the model's class name and state (names, shapes, dtypes, bytes): which model a journal is for."""
    digest = hashlib.sha256(type(model).__name__.encode())
    for name, tensor in model.state_dict().items():
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class _Journal:
    """Rows of finished cases, one JSON file per case in ``output_dir/.medtl3d-run/``, next to the settings they
    were made with (``settings.json``): what lets an interrupted run resume. Removed once the run is published."""

    def __init__(self, output_dir: Path, settings: dict) -> None:
        self.folder = output_dir / JOURNAL_DIR
        settings_file = self.folder / "settings.json"
        try:
            previous = json.loads(settings_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            previous = None
        if previous is not None and previous != settings:
            differs = sorted(k for k in set(previous) | set(settings) if previous.get(k) != settings.get(k))
            logger.warning("%s holds an interrupted run with a different %s: starting over", output_dir,
                           ", ".join(differs))
        if previous != settings:
            shutil.rmtree(self.folder, ignore_errors=True)
            write_json(settings_file, settings)

    def _file(self, case_id: str) -> Path:
        return self.folder / f"{hashlib.sha1(case_id.encode()).hexdigest()}.json"

    def finished(self, case) -> dict | None:
        """The journalled row of ``case``, if it was made from the same files (and its mask is still there)."""
        try:
            entry = json.loads(self._file(case.case_id).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        row = entry.get("row", {})
        if entry.get("source") != _source_stamp(case) or row.get("path") != str(case.path) or \
                (row.get("mask") and not Path(row["mask"]).is_file()):
            return None
        return row

    def put(self, case, row: dict) -> None:
        write_json(self._file(case.case_id), {"source": _source_stamp(case), "row": row})

    def remove(self) -> None:
        shutil.rmtree(self.folder)
