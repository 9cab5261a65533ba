"""The handler that publishes a folder inference run: ``predictions.csv`` (one row per case, in the folder's case
order, then the entries that are not cases) and ``predictions.json`` (the counts, the failures, the settings, the
device and the time), both written atomically at the end, so an interrupted run leaves no partial file."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

from ignite.engine import Engine, Events

from ..errors import OutputError
from ..reporting import write_csv, write_json

logger = logging.getLogger(__name__)

CSV_NAME, JSON_NAME = "predictions.csv", "predictions.json"


@dataclass
class InferenceSummary:
    """What a folder inference did. ``n_failed`` counts every row that is not ``ok`` (``n_skipped`` of them are
    entries that were not cases); ``failures`` lists them as dicts (case_id, path, status, reason); ``n_resumed``
    rows were taken from an interrupted run's journal."""

    n_cases: int
    n_ok: int
    n_failed: int
    n_skipped: int
    csv_path: Path
    json_path: Path
    failures: list[dict] = field(default_factory=list)
    n_resumed: int = 0


def _check_apart(input_dir: Path, output_dir: Path) -> None:
    """Refuse an output folder inside the input folder: the next run would read its masks as cases."""
    inside = Path(os.path.realpath(output_dir))
    source = Path(os.path.realpath(input_dir))
    if source.is_dir() and (inside == source or source in inside.parents):
        raise OutputError(f"output folder {output_dir} is inside the input folder {input_dir}: its predictions and "
                          "masks would be read as cases; choose an output folder outside the input")


class PredictionWriter:
    """Handler: collects the ``rows`` of each iteration (:class:`~medtl3d.inference.CaseRows`) and writes them
    under ``output_dir`` with ``columns`` at ``COMPLETED``; ``settings`` (with ``input_dir``) go into the JSON.
    ``summary`` is the :class:`InferenceSummary` of the last run. Refuses an output folder inside the input."""

    def __init__(self, output_dir: str | os.PathLike, settings: dict, columns: Sequence[str]) -> None:
        self.output_dir, self.settings, self.columns = Path(output_dir), dict(settings), list(columns)
        _check_apart(Path(self.settings["input_dir"]), self.output_dir)
        self.rows: list[dict] = []
        self.resumed, self.started = 0, 0.0
        self.summary: InferenceSummary | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.start)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.collect)
        engine.add_event_handler(Events.COMPLETED, self.write)

    def start(self, engine: Engine) -> None:
        self.rows, self.resumed, self.started, self.summary = [], 0, time.perf_counter(), None

    def collect(self, engine: Engine) -> None:
        for finished in engine.state.output["rows"]:
            self.rows.append(finished.row)
            self.resumed += finished.resumed

    def write(self, engine: Engine) -> None:
        statuses = [row["status"] for row in self.rows]
        failures = [{k: row.get(k, "") for k in ("case_id", "path", "status", "reason")}
                    for row in self.rows if row["status"] != "ok"]
        summary = InferenceSummary(n_cases=len(statuses), n_ok=statuses.count("ok"), n_failed=len(failures),
                                   n_skipped=statuses.count("skipped"), csv_path=self.output_dir / CSV_NAME,
                                   json_path=self.output_dir / JSON_NAME, failures=failures, n_resumed=self.resumed)
        report = {**{k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(summary).items()}, **self.settings,
                  "device": str(engine.state.device), "seconds": round(time.perf_counter() - self.started, 3)}
        write_csv(summary.csv_path, self.rows, self.columns)
        write_json(summary.json_path, report)
        self.summary = summary
        logger.info("%d case(s): %d ok, %d failed -> %s", summary.n_cases, summary.n_ok, summary.n_failed,
                    summary.csv_path)
