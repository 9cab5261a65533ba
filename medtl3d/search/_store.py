"""The results store of one search: a JSON-lines file, appended and fsync'ed as each trial finishes.

Line 1 is the search's header (its configuration and that configuration's fingerprint); every other line is one
record (a trial at a rung or finished, the probe scores, the cost table, one summary per search call). Re-opening
the store with the same configuration returns the finished records so that they are not run again; a different
configuration is refused rather than mixed in. A line cut short by a kill (the only one that can be: each record is
one ``write`` of a whole line) is dropped when the store is opened. JSON lines rather than SQLite: one appending
writer (the driver), records read back whole, and a file a person can ``tail``.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterator

from ..errors import SearchError

FORMAT = "medtl3d-search/2"


def fingerprint(config: dict) -> str:
    """Stable short hash of a JSON-able configuration."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new), key=str):
            out += _differences(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} in the store, {new!r} now"]


class ResultsStore:
    """Append-only JSON-lines store bound to one search configuration."""

    def __init__(self, path: str | Path, config: dict) -> None:
        self.path = Path(path)
        self.config = json.loads(json.dumps(config, sort_keys=True, default=str))
        self.fingerprint = fingerprint(self.config)
        self.records: list[dict] = []
        if self.path.is_file() and self.path.stat().st_size:
            self._load()
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._append({"format": FORMAT, "kind": "header", "fingerprint": self.fingerprint, "config": self.config})

    def _load(self) -> None:
        raw = self.path.read_bytes()
        complete = raw[: raw.rfind(b"\n") + 1]
        if len(complete) != len(raw):  # a write cut short by a kill: drop it before appending again
            with open(self.path, "r+b") as handle:
                handle.truncate(len(complete))
        lines = [json.loads(line) for line in complete.decode().splitlines() if line.strip()]
        if not lines or lines[0].get("kind") != "header" or lines[0].get("format") != FORMAT:
            raise SearchError(f"{self.path} is not a medtl3d search results store (no {FORMAT} header)")
        header = lines[0]
        if header["fingerprint"] != self.fingerprint:
            changed = _differences(header["config"], self.config)
            raise SearchError(
                f"results store {self.path} belongs to a different search configuration ("
                + "; ".join(changed[:6]) + ("; ..." if len(changed) > 6 else "")
                + "); refusing to mix results: use another output directory or delete the store")
        self.records = lines[1:]

    def _append(self, record: dict) -> None:
        line = (json.dumps(record, sort_keys=True, default=str) + "\n").encode()
        with open(self.path, "ab") as handle:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())

    def add(self, record: dict) -> None:
        """Persist ``record`` (a dict with a ``kind``) before returning."""
        self._append(record)
        self.records.append(json.loads(json.dumps(record, sort_keys=True, default=str)))

    def of_kind(self, kind: str) -> Iterator[dict]:
        return (r for r in self.records if r.get("kind") == kind)

    def trial(self, key: str) -> dict | None:
        """The latest record of trial ``key`` (a trial paused at a rung gets a new record at each rung)."""
        return next((r for r in reversed(self.records) if r.get("kind") == "trial" and r["key"] == key), None)
