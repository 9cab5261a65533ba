"""Where a model came from: one ``provenance`` record in every model the toolkit writes, and content hashes of data.

:func:`build_provenance` is the one place that makes the record: package versions (medtl3d, torch, MONAI, Python),
the git commit of a medtl3d checkout, the pretrained weights (name, or file name and its SHA-256), the data's
content hash, the resolved configuration, a run id and the creation time (UTC). :func:`data_hash` hashes a list of
data items by *content*: every value that names an existing file (or a DICOM folder) is replaced by the SHA-256 of
its bytes before the items are hashed, so the same data moved elsewhere hashes the same and one changed byte does
not. Above ``byte_limit`` bytes of files (default 2 GiB) the files enter by name and size only, and the record says
so (``hashed``).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import Any

import monai
import numpy as np
import torch

from ._version import __version__

HASH_BYTE_LIMIT = 2 * 2**30
_CHUNK = 1 << 20


@lru_cache(maxsize=4096)
def _cached_sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes (remembered per path, size and modification time within a process)."""
    stat = os.stat(path)
    return _cached_sha256(os.path.abspath(path), stat.st_size, stat.st_mtime_ns)


def _files_of(value: Any, found: dict[str, list[Path]]) -> None:
    """Every string in ``value`` that names an existing file or folder, with the files it stands for."""
    if isinstance(value, (str, os.PathLike)) and str(value) not in found:
        path = Path(value)
        try:
            if path.is_file():
                found[str(value)] = [path]
            elif path.is_dir():
                found[str(value)] = sorted(p for p in path.rglob("*") if p.is_file())
        except OSError:  # a string too long or odd to be a path
            pass
    elif isinstance(value, Mapping):
        for item in value.values():
            _files_of(item, found)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _files_of(item, found)


def _tensor_hash(value) -> str:
    array = np.ascontiguousarray(value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else value)
    return "array:" + hashlib.sha256(f"{array.dtype}{array.shape}".encode() + array.tobytes()).hexdigest()


def data_hash(items: Sequence | None, byte_limit: int = HASH_BYTE_LIMIT) -> dict:
    """Content hash of data ``items`` (datalist entries or in-memory samples); see the module docstring."""
    if items is None:
        return {"sha256": None, "hashed": "nothing: the dataset exposes no list of items"}
    items = list(items)
    found: dict[str, list[Path]] = {}
    _files_of(items, found)
    total = sum(p.stat().st_size for paths in found.values() for p in paths)
    by_content = total <= byte_limit

    def file_entry(paths: list[Path], root: str) -> str:
        parts = [(str(p.relative_to(root)) if p != Path(root) else "",
                  sha256_file(p) if by_content else p.stat().st_size) for p in paths]
        if not by_content:
            parts.append(Path(root).name)
        return ("sha256:" if by_content else "name+size:") + hashlib.sha256(json.dumps(parts).encode()).hexdigest()

    entries = {name: file_entry(paths, name) for name, paths in found.items()}

    def canonical(value: Any) -> Any:
        if isinstance(value, (str, os.PathLike)) and str(value) in entries:
            return entries[str(value)]
        if isinstance(value, (torch.Tensor, np.ndarray)):
            return _tensor_hash(value)
        if isinstance(value, Mapping):
            return {str(k): canonical(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [canonical(v) for v in value]
        return value if value is None or isinstance(value, (bool, int, float, str)) else repr(value)

    digest = hashlib.sha256(json.dumps(canonical(items), sort_keys=True).encode()).hexdigest()
    files = sum(len(paths) for paths in found.values())
    hashed = ("the items, each listed file by its bytes" if by_content else
              f"the items, each listed file by name and size only ({total} bytes > byte_limit {byte_limit})")
    return {"sha256": digest, "items": len(items), "files": files, "bytes": total, "hashed": hashed}


def dataset_items(dataset) -> Sequence | None:
    """The item list behind a dataset: a list itself, MONAI's ``Dataset.data`` or ``WindowDataset.items``."""
    if isinstance(dataset, (list, tuple)):
        return dataset
    for name in ("data", "items"):
        rows = getattr(dataset, name, None)
        if isinstance(rows, Sequence):
            return rows
    return None


def weights_record(source: str | os.PathLike | Mapping | None) -> dict:
    """The pretrained weights a model started from: a registered name as is, a file by name and SHA-256, a load
    record (a backbone's ``weights_record``: catalogue entry, file, SHA-256, tensors loaded/adapted) as it is."""
    if source is None:
        return {"source": None}
    if isinstance(source, Mapping):
        file = source.get("file")
        return {"source": source.get("entry") or (Path(file).name if file else source.get("source")),
                **({"path": file} if file else {}), **{k: v for k, v in source.items() if k != "file"}}
    if Path(source).is_file():
        return {"source": Path(source).name, "path": str(Path(source).resolve()), "sha256": sha256_file(source)}
    return {"source": str(source)}


@lru_cache(maxsize=1)
def git_commit() -> str | None:
    """The commit of the medtl3d checkout the package runs from; None when it is not a git checkout (or no git)."""
    root = Path(__file__).resolve().parents[1]
    try:
        done = subprocess.run(["git", "-C", str(root), "rev-parse", "--show-toplevel", "HEAD"], capture_output=True,
                              text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    top, commit = (done.stdout.splitlines() + ["", ""])[:2]
    return commit if Path(top).resolve() == root else None  # not the commit of a repository that merely holds us


def build_provenance(*, weights: str | os.PathLike | Mapping | None = None, data: Mapping[str, Any] | None = None,
                     config: Mapping[str, Any] | None = None) -> dict:
    """The provenance record of a model: ``weights`` its pretrained source (name or file), ``data`` content hashes
    (:func:`data_hash`) by split, ``config`` the resolved configuration that made it."""
    return {
        "run_id": uuid.uuid4().hex,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": {"medtl3d": __version__, "torch": str(torch.__version__), "monai": str(monai.__version__),
                     "python": platform.python_version()},
        "git_commit": git_commit(),
        "command": " ".join(sys.argv),
        "weights": weights_record(weights),
        "data": dict(data or {}),
        "config": dict(config or {}),
    }
