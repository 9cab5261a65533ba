"""Efficiency reports per cut point: parameters, MACs (fvcore, cross-checked) and wall-clock latency.

``efficiency_report(backbone, strategy, cuts, input_shape, ...)`` (as a bundle component:
:class:`EfficiencyBenchmark`) builds the full model and the strategy's model at every requested cut point, counts
each once, times them all at every batch size, interleaved (round-robin, so that a change of machine load hits
every cut alike; each row says whether its timings are reliable), and returns an :class:`EfficiencyReport` (rows +
context) that writes CSV, JSON, Markdown and a PNG plot.
"""

from __future__ import annotations

import contextlib
import os
import platform
from typing import Callable, Sequence

import torch
from torch import nn

from ..backbones import Backbone, CutPoint, build_backbone, get_entry
from ..config_ids import check_component_options
from ..errors import EfficiencyError, StrategyNotApplicableError, UnknownBackboneError
from ..models import TruncatedUNet
from ..strategies import CUT_STRATEGIES, apply_strategy
from ._counting import EXCLUDED_OPS, MAC_CONVENTION, MacCount, count_macs, count_params, pooling_rules
from ._report import EfficiencyReport, EfficiencyRow
from ._timing import (
    RELIABLE_RELATIVE_IQR,
    CudaEventStopwatch,
    LatencyStats,
    PeakMemory,
    PerfCounterStopwatch,
    measure_interleaved,
    measure_latency,
    paired_ratio,
    stopwatch_for,
    synchronizer_for,
)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_TIMERS = {CudaEventStopwatch: "CUDA events + synchronize", PerfCounterStopwatch: "time.perf_counter"}


def parse_shape(shape: str | Sequence[int]) -> tuple[int, ...]:
    """``"3x224x224"`` or ``(3, 224, 224)`` -> ``(3, 224, 224)`` (channels first, no batch axis)."""
    try:
        values = tuple(int(s) for s in (shape.lower().split("x") if isinstance(shape, str) else shape))
    except ValueError:
        raise EfficiencyError(f"input shape {shape!r} is not CxHxW or CxDxHxW (e.g. 3x224x224)") from None
    if len(values) not in (3, 4) or min(values) < 1:
        raise EfficiencyError(f"input shape {shape!r} must be CxHxW or CxDxHxW with positive sizes")
    return values


def resolve_device(device: str | torch.device) -> torch.device:
    """A usable torch device, or an error naming what is missing."""
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise EfficiencyError(f"unknown device {device!r}: {exc}") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise EfficiencyError(f"device {device!r} is not available: this machine has no CUDA GPU (use --device cpu)")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise EfficiencyError(f"device {device!r} is not available: {torch.cuda.device_count()} CUDA device(s)")
    elif resolved.type == "mps" and not torch.backends.mps.is_available():
        raise EfficiencyError(f"device {device!r} is not available on this machine")
    elif resolved.type not in ("cpu", "cuda", "mps"):
        raise EfficiencyError(f"device {device!r} is not supported; use cpu or cuda")
    return resolved


def _select_cuts(backbone: Backbone, cuts: str | Sequence[str]) -> list[CutPoint]:
    """``all``/``block``/``layer``, a comma-separated string or a list of names; unknown names raise."""
    if isinstance(cuts, str) and cuts in ("all", "block", "layer"):
        return backbone.cut_points_at(cuts)
    names = cuts.split(",") if isinstance(cuts, str) else list(cuts)
    return [backbone.cut_point(name.strip()) for name in names]


def _check_input(backbone: Backbone, shape: tuple[int, ...]) -> None:
    """The input must match the backbone's channels and dimensionality and reach its registered minimum size."""
    channels, spatial = shape[0], shape[1:]
    if len(spatial) != backbone.spatial_dims:
        raise EfficiencyError(f"{backbone.name} is {backbone.spatial_dims}D: input shape {shape} has "
                              f"{len(spatial)} spatial axes")
    if channels != backbone.in_channels:
        raise EfficiencyError(f"{backbone.name} takes {backbone.in_channels} input channels, input shape {shape} "
                              f"has {channels}")
    try:
        minimum = get_entry(backbone.name).too_small(spatial)
    except UnknownBackboneError:
        minimum = None  # an unregistered backbone: the forward-pass check below still applies
    if minimum is not None:
        raise EfficiencyError(
            f"input {'x'.join(map(str, shape))} is too small for {backbone.name}: its strides need at least "
            f"{'x'.join(map(str, minimum))} (spatial)"
        )


def _runner(model: nn.Module, example: torch.Tensor, device: torch.device, amp: bool) -> Callable[[], None]:
    autocast = (torch.autocast(device.type, dtype=torch.float16 if device.type == "cuda" else torch.bfloat16)
                if amp else contextlib.nullcontext())

    def run() -> None:
        with torch.inference_mode(), autocast:
            model(example)

    return run


def _time_interleaved(models: Sequence[nn.Module], rows: Sequence[EfficiencyRow], example: torch.Tensor,
                      device: torch.device, amp: bool, warmup: int, runs: int, stopwatch) -> None:
    """Fill the latency, memory and ratio columns of ``rows`` (one per model, the full model first, one batch size).

    Peak memory comes from one untimed run per model on its own; then the models are timed interleaved
    (:func:`measure_interleaved`) and ``latency_ratio`` is the median of the per-round ratios to the full model.
    """
    runners = [_runner(model, example, device, amp) for model in models]
    for row, run in zip(rows, runners):
        with PeakMemory(device) as memory:
            run()
        row.peak_memory_mib = memory.peak_mib
    timed = measure_interleaved(runners, stopwatch, warmup, runs, synchronizer_for(device))
    for row, stats in zip(rows, timed):
        row.latency_median_ms, row.latency_p90_ms = stats.median_ms, stats.p90_ms
        row.latency_min_ms, row.latency_max_ms = stats.min_ms, stats.max_ms
        row.latency_iqr_ms, row.latency_relative_iqr = stats.iqr_ms, stats.relative_iqr
        row.latency_reliable = stats.reliable
        row.throughput_per_s = 1000.0 * row.batch / stats.median_ms if stats.median_ms > 0 else None
        row.latency_ratio = paired_ratio(stats.samples_ms, timed[0].samples_ms)


def _metadata(backbone: Backbone, strategy: str, shape, batch_sizes, device: torch.device, dtype: str, amp: bool,
              channels_last: bool, warmup: int, runs: int, num_classes: int, stopwatch) -> dict:
    cuda = device.type == "cuda"
    return {
        "backbone": backbone.name,
        "strategy": strategy,
        "spatial_dims": backbone.spatial_dims,
        "input_shape": "x".join(map(str, shape)),
        "batch_sizes": list(batch_sizes),
        "num_classes": num_classes,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if cuda else (platform.processor() or platform.machine()),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "dtype": dtype,
        "amp": amp,
        "channels_last": channels_last,
        "warmup": warmup,
        "runs": runs,
        "timer": _TIMERS.get(type(stopwatch), type(stopwatch).__name__),
        "schedule": (f"interleaved: {warmup} warm-up runs per model, then {runs} rounds of one timed run per model "
                     f"(rotating order); reliable when IQR <= {RELIABLE_RELATIVE_IQR:g} x median; latency / full "
                     "is the median of per-round ratios"),
        "peak_memory": "CUDA max_memory_allocated" if cuda else "resident-set growth above the start (sampled from /proc/self/statm)",
        "mac_convention": MAC_CONVENTION,
        "pooling_rules": pooling_rules(),
        "excluded_ops": list(EXCLUDED_OPS),
    }


def check_efficiency_options(backbone: str | Backbone, input_shape: str | Sequence[int] | None,
                             batch_sizes: Sequence[int], device: str | torch.device, dtype: str, runs: int,
                             warmup: int) -> torch.device:
    """Refuse the options of :func:`efficiency_report` that cannot be measured, before any model is built;
    returns the device."""
    target = resolve_device(device)
    if dtype not in DTYPES:
        raise EfficiencyError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if any(int(b) < 1 for b in batch_sizes) or not batch_sizes:
        raise EfficiencyError(f"batch sizes must be >= 1, got {list(batch_sizes)}")
    for name, value in (("runs", runs), ("warmup", warmup)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise EfficiencyError(f"{name} must be an integer >= 0, got {value!r}")
    if isinstance(backbone, str):
        entry = get_entry(backbone)
        dims = len(parse_shape(input_shape)) - 1 if input_shape is not None else entry.spatial_dims[0]
        if dims not in entry.spatial_dims:
            raise EfficiencyError(f"{backbone} supports {entry.spatial_dims}D input, input shape {input_shape} "
                                  f"is {dims}D")
    return target


def efficiency_report(
    backbone: str | Backbone,
    strategy: str = "truncate",
    cuts: str | Sequence[str] = "block",
    input_shape: str | Sequence[int] | None = None,
    batch_sizes: Sequence[int] = (1,),
    device: str | torch.device = "cpu",
    dtype: str = "float32",
    amp: bool = False,
    channels_last: bool = False,
    warmup: int = 5,
    runs: int = 20,
    num_classes: int = 2,
    output_dir: str | None = None,
    model_builder: Callable[..., nn.Module] | None = None,
    stopwatch=None,
    **strategy_kwargs,
) -> EfficiencyReport:
    """Measure the full model and ``strategy`` at each of ``cuts``; ``runs=0`` counts without timing.

    ``backbone`` is a registry name (built with random weights: cost does not depend on them) or a built backbone.
    ``input_shape`` is channels first without the batch axis (default: the registry's default input). MACs are
    counted per sample in float32; latency uses ``dtype``/``amp``/``channels_last`` on ``device``.
    ``model_builder(backbone, strategy, num_classes, cut=..., **strategy_kwargs)`` replaces
    :func:`~medtl3d.strategies.apply_strategy` to measure other models built on the cut backbone (e.g. a U-Net).
    The models are timed interleaved: ``runs`` rounds of one run each, after one untimed run each that measures
    its peak memory and ``warmup`` untimed runs each; ``stopwatch`` times one run (default: the one that times
    ``device`` correctly, :func:`stopwatch_for`).
    """
    target = check_efficiency_options(backbone, input_shape, batch_sizes, device, dtype, runs, warmup)
    stopwatch = stopwatch or stopwatch_for(target)
    if isinstance(backbone, str):
        dims = len(parse_shape(input_shape)) - 1 if input_shape is not None else get_entry(backbone).spatial_dims[0]
        channels = parse_shape(input_shape)[0] if input_shape is not None else None
        backbone = build_backbone(backbone, dims, in_channels=channels)  # e.g. 1-channel CT into an RGB design
    if input_shape is None:
        shape = (backbone.in_channels, *get_entry(backbone.name).default_input[backbone.spatial_dims])
    else:
        shape = parse_shape(input_shape)
    _check_input(backbone, shape)
    selected = _select_cuts(backbone, cuts) if strategy in CUT_STRATEGIES else []

    build = model_builder or apply_strategy
    models: list[tuple[nn.Module, str, CutPoint, bool]] = []
    last = backbone.cut_points[-1]
    models.append((build(backbone, "full", num_classes), "full", last, True))
    notes: list[str] = []
    if strategy in CUT_STRATEGIES:
        for cut in selected:
            try:
                model = build(backbone, strategy, num_classes, cut=cut.name, **strategy_kwargs)
            except StrategyNotApplicableError as exc:
                notes.append(f"{strategy} at {cut.name} skipped: {exc}")
                continue
            models.append((model, strategy, cut, False))
    elif strategy != "full":
        models.append((build(backbone, strategy, num_classes, **strategy_kwargs), strategy, last, False))

    memory_format = {2: torch.channels_last, 3: torch.channels_last_3d}[backbone.spatial_dims]
    rows: list[EfficiencyRow] = []
    timed_models: list[nn.Module] = []
    for model, name, cut, is_full in models:
        label = f"{backbone.name} ({'full model' if is_full else f'{name} at {cut.name}'})"
        example = torch.randn(1, *shape)
        macs: MacCount = count_macs(model, example, label)
        params = count_params(model)
        if runs > 0:
            model = model.to(target, DTYPES[dtype])
            if channels_last:
                model = model.to(memory_format=memory_format)
            timed_models.append(model)
        for batch in batch_sizes:
            row = EfficiencyRow(
                backbone=backbone.name, strategy=name, cut=cut.name, level=cut.level, is_full=is_full,
                batch=int(batch), params=params, params_m=params / 1e6, macs_g=macs.fvcore / 1e9,
                flop_counter_macs_g=macs.flop_counter / 1e9, mac_difference_pct=100 * macs.relative_difference,
                mac_difference_ops=macs.difference_note(),
                unsupported_ops=", ".join(f"{op} x{n}" for op, n in sorted(macs.unsupported_ops.items())),
            )
            rows.append(row)
    if runs > 0:
        for batch in batch_sizes:
            batch_input = torch.randn(int(batch), *shape, device=target, dtype=DTYPES[dtype])
            if channels_last:
                batch_input = batch_input.contiguous(memory_format=memory_format)
            _time_interleaved(timed_models, [r for r in rows if r.batch == batch], batch_input, target, amp,
                              warmup, runs, stopwatch)
    _add_ratios(rows)
    report = EfficiencyReport(rows, _metadata(backbone, strategy, shape, batch_sizes, target, dtype, amp, channels_last,
                                              warmup, runs, num_classes, stopwatch), notes)
    if output_dir is not None:
        report.write(output_dir)
    return report


def _add_ratios(rows: list[EfficiencyRow]) -> None:
    """Divide params and MACs by the full model's, at the same batch size (latency: see :func:`_time_interleaved`)."""
    full = {r.batch: r for r in rows if r.is_full}
    for row in rows:
        base = full[row.batch]
        row.params_ratio = row.params / base.params
        row.macs_ratio = row.macs_g / base.macs_g if base.macs_g else None


class EfficiencyBenchmark:
    """:func:`efficiency_report` as a bundle component: ``efficiency.yaml`` builds it from its ids and runs
    ``$@efficiency.run()``. The options are :func:`efficiency_report`'s, checked here
    (:func:`check_efficiency_options`), so a wrong value stops while the config is parsed; errors start with
    ``efficiency:``, the component's id in the bundles. ``segmentation_classes`` measures the bundle's U-Net
    (:class:`~medtl3d.models.TruncatedUNet`) at each cut instead of a classifier; ``stopwatch``
    (``efficiency#stopwatch``) times one run."""

    def __init__(self, backbone: str, output_dir: str, *, segmentation_classes: int | None = None,
                 **options) -> None:
        check_component_options(
            "efficiency", efficiency_report,
            lambda given: check_efficiency_options(backbone, given["input_shape"], given["batch_sizes"],
                                                   given["device"], given["dtype"], given["runs"], given["warmup"]),
            EfficiencyError, backbone, output_dir=output_dir, **options)
        if segmentation_classes is not None:
            options["model_builder"] = lambda body, name, num_classes, cut=None, **_: TruncatedUNet(
                body, segmentation_classes, cut=cut)
        self.backbone, self.output_dir, self.options = backbone, output_dir, options

    def run(self) -> EfficiencyReport:
        """Measure, write the report (CSV, JSON, Markdown, PNG) to ``output_dir``, print its table; return it."""
        report = efficiency_report(self.backbone, output_dir=self.output_dir, **self.options)
        print(report.to_markdown())
        print(f"medtl3d: efficiency report written to {self.output_dir}")
        return report


__all__ = [
    "CudaEventStopwatch", "EfficiencyBenchmark", "EfficiencyReport", "EfficiencyRow", "LatencyStats", "MacCount",
    "MAC_CONVENTION", "PerfCounterStopwatch", "check_efficiency_options", "count_macs", "count_params",
    "efficiency_report", "measure_interleaved", "measure_latency", "parse_shape", "resolve_device", "stopwatch_for",
]
