"""The result of an efficiency run: one row per (model, batch size), written as CSV, JSON, Markdown and a PNG plot."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from ..reporting import pyplot, save_figure, write_csv, write_json, write_text


@dataclass
class EfficiencyRow:
    """Cost of one model (the full model, or a strategy at a cut point) at one batch size.

    MACs are per sample; latency, throughput and memory are for the whole batch. Latency fields are None when timing
    was not asked for (``runs=0``). Ratios divide by the full model's value at the same batch size (latency: the
    median of the per-round ratios of the interleaved timing). ``latency_reliable`` is False when the timed runs
    spread too much (IQR above a quarter of the median) for their median to be read as the model's latency.
    """

    backbone: str
    strategy: str
    cut: str
    level: str
    is_full: bool
    batch: int
    params: int
    params_m: float
    macs_g: float
    flop_counter_macs_g: float
    mac_difference_pct: float
    mac_difference_ops: str
    unsupported_ops: str
    latency_median_ms: float | None = None
    latency_p90_ms: float | None = None
    latency_min_ms: float | None = None
    latency_max_ms: float | None = None
    throughput_per_s: float | None = None
    peak_memory_mib: float | None = None
    params_ratio: float | None = None
    macs_ratio: float | None = None
    latency_ratio: float | None = None
    latency_iqr_ms: float | None = None
    latency_relative_iqr: float | None = None
    latency_reliable: bool | None = None


COLUMNS = [f.name for f in fields(EfficiencyRow)]
MARKDOWN_COLUMNS = {
    "strategy": "strategy", "cut": "cut", "batch": "batch", "params_m": "params (M)", "macs_g": "GMACs",
    "mac_difference_pct": "fvcore vs flop_counter (%)", "latency_median_ms": "median (ms)",
    "latency_p90_ms": "p90 (ms)", "latency_iqr_ms": "IQR (ms)", "latency_reliable": "reliable",
    "throughput_per_s": "samples/s", "peak_memory_mib": "peak mem (MiB)",
    "params_ratio": "params / full", "macs_ratio": "MACs / full", "latency_ratio": "latency / full",
}


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


@dataclass
class EfficiencyReport:
    """Rows plus the run's context (device, versions, threads, input, dtype, counting convention); compute once,
    then query as rows, a Markdown table, or files."""

    rows: list[EfficiencyRow]
    metadata: dict
    notes: list[str] = field(default_factory=list)

    @property
    def full(self) -> list[EfficiencyRow]:
        return [r for r in self.rows if r.is_full]

    def rows_for(self, batch: int | None = None, strategy: str | None = None) -> list[EfficiencyRow]:
        return [r for r in self.rows if (batch is None or r.batch == batch) and (strategy is None or r.strategy == strategy)]

    def to_markdown(self) -> str:
        meta = self.metadata
        title = (f"### {meta['backbone']} — {meta['strategy']} — input {meta['input_shape']} — {meta['device_name']} "
                 f"({meta['dtype']}{', AMP' if meta['amp'] else ''}, {meta['threads']} threads)")
        header = "| " + " | ".join(MARKDOWN_COLUMNS.values()) + " |"
        rule = "|" + "|".join("---" for _ in MARKDOWN_COLUMNS) + "|"
        lines = [title, "", header, rule]
        for row in self.rows:
            cells = [_cell(getattr(row, key)) for key in MARKDOWN_COLUMNS]
            if row.is_full:
                cells[0] = f"**{cells[0]}** (full model)"
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", f"MACs: {meta['mac_convention']}."]
        lines += [f"- {row.cut} ({row.strategy}): MAC difference explained by {row.mac_difference_ops}"
                  for row in self.rows if row.mac_difference_ops and row.batch == self.rows[0].batch]
        lines += [f"- unsupported by fvcore at {row.cut} ({row.strategy}): {row.unsupported_ops}"
                  for row in self.rows if row.unsupported_ops and row.batch == self.rows[0].batch]
        lines += [f"- {note}" for note in self.notes]
        unreliable = [f"{row.cut} ({row.strategy}, batch {row.batch})" for row in self.rows
                      if row.latency_reliable is False]
        if unreliable:
            lines.append(f"- latency unreliable (IQR above a quarter of the median: the machine's load changed while "
                         f"timing?) at {', '.join(unreliable)}: read their latency columns as rough, and compare cuts "
                         "by latency / full, which is measured round by round")
        return "\n".join(lines) + "\n"

    def write_csv(self, path: str | Path) -> Path:
        return write_csv(path, [asdict(r) for r in self.rows], COLUMNS)

    def write_json(self, path: str | Path) -> Path:
        return write_json(path, {"metadata": self.metadata, "notes": self.notes, "rows": [asdict(r) for r in self.rows]})

    def write_markdown(self, path: str | Path) -> Path:
        return write_text(path, self.to_markdown())

    def plot(self, path: str | Path) -> Path:
        """Params, MACs and latency against the cut point (one line per batch size), the full model dashed."""
        plt = pyplot()
        panels = [("params_m", "params (M)"), ("macs_g", "GMACs / sample"), ("latency_median_ms", "median latency (ms)")]
        timed = any(r.latency_median_ms is not None for r in self.rows)
        panels = panels if timed else panels[:2]
        figure, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
        for axis, (key, label) in zip(axes[0], panels):
            for batch in sorted({r.batch for r in self.rows}):
                cut_rows = [r for r in self.rows_for(batch) if not r.is_full]
                axis.plot([r.cut for r in cut_rows], [getattr(r, key) for r in cut_rows], marker="o",
                          label=f"{self.metadata['strategy']}, batch {batch}")
                for full in (r for r in self.rows_for(batch) if r.is_full):
                    axis.axhline(getattr(full, key), linestyle="--", color="grey")
            axis.plot([], [], linestyle="--", color="grey", label="full model")
            axis.set_xlabel("cut point")
            axis.set_ylabel(label)
            axis.tick_params(axis="x", labelrotation=45)
            axis.legend(fontsize="small")
        figure.suptitle(f"{self.metadata['backbone']} {self.metadata['input_shape']} on {self.metadata['device_name']}")
        figure.tight_layout()
        return save_figure(figure, path)

    def write(self, output_dir: str | Path, stem: str | None = None) -> dict[str, Path]:
        """Write ``<stem>.csv/.json/.md/.png`` under ``output_dir``; returns the paths by format."""
        directory = Path(output_dir)
        stem = stem or f"{self.metadata['backbone']}_{self.metadata['strategy']}"
        return {
            "csv": self.write_csv(directory / f"{stem}.csv"),
            "json": self.write_json(directory / f"{stem}.json"),
            "md": self.write_markdown(directory / f"{stem}.md"),
            "png": self.plot(directory / f"{stem}.png"),
        }
