"""One place for writing results: atomic file writes, tables (CSV + JSON + Markdown), curves, bars and heatmaps.

Every report of the package (analyses, cutoff search, efficiency) writes its numbers as CSV and JSON (with a
``metadata`` block), a Markdown table, and a PNG: curves for per-layer results, a heatmap for layer x layer matrices.
Every file the package writes (reports, checkpoints, datalists, phantoms, predictions) goes through
:func:`atomic_write` (a temporary file in the same directory, then ``os.replace``), so an interrupted run never
leaves a half-written file; a run that writes an output folder holds :func:`medtl3d.locking.output_lock` on it, so
two runs never write one folder.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import threading
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np


def atomic_write(path: str | Path, write: Callable[[Path], None], *, durable: bool = False,
                 suffix: str = ".tmp") -> Path:
    """Call ``write(temp_path)`` on a temporary file next to ``path``, then move it into place (the temporary file is
    created by ``write`` itself, so it gets the usual permissions). ``durable`` flushes it to disk first (for
    checkpoints, which must survive a power cut, not only a killed process). ``suffix`` ends the temporary name,
    for writers that pick the format by extension (``.nii.gz``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}{suffix}")
    try:
        write(temp)
        if durable:
            with open(temp, "rb+") as handle:
                os.fsync(handle.fileno())
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)
    return path


def write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda temp: temp.write_text(text, encoding="utf-8"))


def write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda temp: temp.write_bytes(data))


def _plain(value):
    """JSON-safe scalars: numpy numbers become Python numbers, NaN/inf become None (strict JSON)."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def write_json(path: str | Path, document) -> Path:
    return write_text(path, json.dumps(_plain(document), indent=2) + "\n")


def _columns(rows: Sequence[Mapping]) -> list[str]:
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    return columns


def write_csv(path: str | Path, rows: Sequence[Mapping], columns: Sequence[str] | None = None) -> Path:
    columns = list(columns or _columns(rows))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows({k: _plain(row.get(k)) for k in columns} for row in rows)
    return write_text(path, buffer.getvalue())


def _cell(value) -> str:
    value = _plain(value)
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def markdown_table(rows: Sequence[Mapping], columns: Sequence[str] | None = None, title: str | None = None) -> str:
    columns = list(columns or _columns(rows))
    lines = [f"### {title}", ""] if title else []
    lines.append("| " + " | ".join(columns) + " |")
    lines.append("|" + "|".join("---" for _ in columns) + "|")
    lines.extend("| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows)
    return "\n".join(lines) + "\n"


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure, path: str | Path, dpi: int = 100) -> Path:
    """Save a matplotlib figure atomically as PNG and close it."""
    plt = pyplot()
    try:
        return atomic_write(path, lambda temp: figure.savefig(temp, format="png", dpi=dpi))
    finally:
        plt.close(figure)


def plot_curves(path: str | Path, rows: Sequence[Mapping], x: str, ys: Sequence[str], title: str = "",
                group: str | None = None, ylabel: str | None = None) -> Path:
    """One panel per ``ys`` column against the ``x`` column (layers in row order); one line per ``group`` value."""
    plt = pyplot()
    groups: dict[object, list[Mapping]] = {}
    for row in rows:
        groups.setdefault(row.get(group) if group else None, []).append(row)
    points = max((len(members) for members in groups.values()), default=1)
    width = max(4.5, 0.3 * points + 2.0)
    figure, axes = plt.subplots(1, len(ys), figsize=(width * len(ys), 4), squeeze=False)
    for axis, column in zip(axes[0], ys):
        for name, members in groups.items():
            values = [_plain(r.get(column)) for r in members]
            axis.plot([str(r[x]) for r in members], [np.nan if v is None else v for v in values], marker="o",
                      label=None if name is None else f"{group}={name}")
        axis.set_xlabel(x)
        axis.set_ylabel(ylabel or column)
        axis.set_title(column)
        axis.tick_params(axis="x", labelrotation=60, labelsize="small")
        if group:
            axis.legend(fontsize="small")
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    return save_figure(figure, path)


def plot_bars(path: str | Path, values: Mapping[str, float], title: str = "", ylabel: str = "",
              reference: Mapping[str, float] | None = None) -> Path:
    """A bar per named value (e.g. the metrics of three inits); ``reference`` values are drawn as dashed lines."""
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(max(4.0, 0.9 * len(values) + 2.0), 3.5))
    names = list(values)
    heights = [np.nan if _plain(values[n]) is None else float(values[n]) for n in names]
    axis.bar(names, heights, color="tab:blue")
    for name, height in zip(names, heights):
        if np.isfinite(height):
            axis.annotate(f"{height:.3g}", (name, height), ha="center", va="bottom", fontsize="small")
    for label, level in (reference or {}).items():
        axis.axhline(float(level), linestyle="--", color="grey")
        axis.annotate(label, (len(names) - 0.5, float(level)), ha="right", va="bottom", fontsize="small",
                      color="grey")
    axis.set_ylabel(ylabel)
    if title:
        axis.set_title(title)
    figure.tight_layout()
    return save_figure(figure, path)


def plot_heatmap(path: str | Path, matrix, row_labels: Sequence[str], col_labels: Sequence[str], title: str = "",
                 value_label: str = "", row_axis: str = "", col_axis: str = "", vmin: float | None = None,
                 vmax: float | None = None) -> Path:
    """A layer x layer heatmap, rows from the top, values printed in the cells when the matrix is small."""
    plt = pyplot()
    matrix = np.asarray(matrix, dtype=float)
    size = (max(4.0, 0.45 * len(col_labels) + 2.5), max(3.5, 0.4 * len(row_labels) + 1.5))
    figure, axis = plt.subplots(figsize=size)
    image = axis.imshow(matrix, cmap="magma", vmin=vmin, vmax=vmax, aspect="auto")
    axis.set_xticks(range(len(col_labels)), [str(c) for c in col_labels], rotation=60, ha="right", fontsize="small")
    axis.set_yticks(range(len(row_labels)), [str(r) for r in row_labels], fontsize="small")
    axis.set_xlabel(col_axis)
    axis.set_ylabel(row_axis)
    if matrix.size <= 400:
        finite = matrix[np.isfinite(matrix)]
        middle = (finite.min() + finite.max()) / 2 if finite.size else 0.0
        for (i, j), value in np.ndenumerate(matrix):
            if np.isfinite(value):
                axis.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize="x-small",
                          color="black" if value > middle else "white")
    figure.colorbar(image, ax=axis, label=value_label)
    if title:
        axis.set_title(title)
    figure.tight_layout()
    return save_figure(figure, path)


def write_table(output_dir: str | Path, stem: str, rows: Sequence[Mapping], metadata: Mapping | None = None,
                title: str | None = None, columns: Sequence[str] | None = None) -> dict[str, Path]:
    """``<stem>.csv``, ``<stem>.json`` (``{"metadata", "rows"}``) and ``<stem>.md`` under ``output_dir``."""
    directory = Path(output_dir)
    columns = list(columns or _columns(rows))
    return {
        "csv": write_csv(directory / f"{stem}.csv", rows, columns),
        "json": write_json(directory / f"{stem}.json", {"metadata": dict(metadata or {}), "rows": list(rows)}),
        "md": write_text(directory / f"{stem}.md", markdown_table(rows, columns, title)),
    }


def write_curves(output_dir: str | Path, stem: str, rows: Sequence[Mapping], x: str, ys: Sequence[str],
                 metadata: Mapping | None = None, title: str = "", group: str | None = None) -> dict[str, Path]:
    """A per-layer result: the table files plus ``<stem>.png`` with one curve per ``ys`` column."""
    paths = write_table(output_dir, stem, rows, metadata, title or None)
    paths["png"] = plot_curves(Path(output_dir) / f"{stem}.png", rows, x, ys, title, group)
    return paths


def write_matrix(output_dir: str | Path, stem: str, matrix, row_labels: Sequence[str], col_labels: Sequence[str],
                 metadata: Mapping | None = None, title: str = "", value_label: str = "", row_axis: str = "",
                 col_axis: str = "", vmin: float | None = None, vmax: float | None = None) -> dict[str, Path]:
    """A layer x layer result: CSV (first column = row label), JSON, Markdown and a heatmap PNG."""
    matrix = np.asarray(matrix, dtype=float)
    if matrix.shape != (len(row_labels), len(col_labels)):
        raise ValueError(f"matrix shape {matrix.shape} does not match {len(row_labels)} x {len(col_labels)} labels")
    directory = Path(output_dir)
    corner = row_axis or "layer"
    rows = [{corner: r, **{str(c): matrix[i, j] for j, c in enumerate(col_labels)}} for i, r in enumerate(row_labels)]
    columns = [corner, *map(str, col_labels)]
    document = {"metadata": dict(metadata or {}), "rows": list(map(str, row_labels)),
                "columns": list(map(str, col_labels)), "matrix": matrix.tolist()}
    return {
        "csv": write_csv(directory / f"{stem}.csv", rows, columns),
        "json": write_json(directory / f"{stem}.json", document),
        "md": write_text(directory / f"{stem}.md", markdown_table(rows, columns, title or None)),
        "png": plot_heatmap(directory / f"{stem}.png", matrix, row_labels, col_labels, title, value_label,
                            row_axis, col_axis, vmin, vmax),
    }
