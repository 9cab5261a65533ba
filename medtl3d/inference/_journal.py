"""The journal of a folder inference run: one file per finished case, so an interrupted run resumes without
predicting a case again, unless its files or the model and settings changed. :class:`Journal` is the evaluator's
handler that keeps it; without it in the handler list, an interrupted run starts over."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import torch
from ignite.engine import Engine, Events
from torch import nn

from ..reporting import write_json

logger = logging.getLogger(__name__)

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


class Journal:
    """Handler: at ``STARTED`` opens the journal of ``output_dir`` for this model (``engine.network``) and
    ``settings`` (discarding one written with others, with a warning naming what differs) and lets the dataset
    (``engine.data_loader.dataset``, a :class:`~medtl3d.inference.CaseDataset`) take the finished cases' rows from
    it instead of reading them again; journals each case as it finishes; removes the journal at ``COMPLETED``.
    List it after :class:`~medtl3d.engine.handlers.OutputLock` (the journal is read and written under the lock)
    and after the handler that publishes the run (:class:`~medtl3d.inference.PredictionWriter`), so the journal
    goes only once the predictions are written."""

    def __init__(self, output_dir: str | os.PathLike, settings: dict) -> None:
        self.output_dir, self.settings = Path(output_dir), dict(settings)
        self.store: _Journal | None = None
        self.resumed = 0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.open)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.put)
        engine.add_event_handler(Events.COMPLETED, self.close)

    def open(self, engine: Engine) -> None:
        self.store = _Journal(self.output_dir, {"model": _model_digest(engine.network), **self.settings})
        self.resumed = 0
        engine.data_loader.dataset.resume = self.store.finished

    def put(self, engine: Engine) -> None:
        for finished in engine.state.output["rows"]:
            if finished.resumed:
                self.resumed += 1
            elif finished.source is not None:
                self.store.put(finished.source, finished.row)

    def close(self, engine: Engine) -> None:
        engine.data_loader.dataset.resume = None
        self.store.remove()
        if self.resumed:
            logger.info("resumed an interrupted run: %d case(s) taken from %s", self.resumed, self.store.folder)
