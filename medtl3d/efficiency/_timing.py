"""Wall-clock latency: W warm-up runs (not measured), then N timed runs summarised by median, p90 and spread.

Several models (the cuts of an efficiency report) are timed *interleaved* (:func:`measure_interleaved`): round-robin,
one run of each per round, so that a change of machine load during the measurement (another job starting on the
CPU) hits all of them alike and their ratios stay right. Each summary carries its interquartile range and a
``reliable`` flag: an IQR above :data:`RELIABLE_RELATIVE_IQR` of the median says the timings varied too much to be
read as one number.

A stopwatch times one run. :class:`PerfCounterStopwatch` reads ``time.perf_counter`` (CPU); :class:`CudaEventStopwatch`
records CUDA events and synchronises before reading them (GPU work is asynchronous, so a host clock alone would time
the kernel launches). Both take their clock / events / synchroniser as arguments, so tests can drive them with fakes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import os
import statistics
import threading
import time
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import torch

RELIABLE_RELATIVE_IQR = 0.25


class PerfCounterStopwatch:
    """Host-clock stopwatch (``time.perf_counter`` by default); ``synchronize`` runs before each reading."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter, synchronize: Callable[[], None] = lambda: None):
        self.clock = clock
        self.synchronize = synchronize
        self._start = 0.0

    def start(self) -> None:
        self.synchronize()
        self._start = self.clock()

    def stop(self) -> float:
        """Milliseconds since :meth:`start`."""
        self.synchronize()
        return (self.clock() - self._start) * 1000.0


class CudaEventStopwatch:
    """CUDA-event stopwatch: events bracket the run on the stream, a synchronise waits for it before reading."""

    def __init__(self, event_factory: Callable[[], object] | None = None,
                 synchronize: Callable[[], None] | None = None):
        self.event_factory = event_factory or (lambda: torch.cuda.Event(enable_timing=True))
        self.synchronize = synchronize or torch.cuda.synchronize
        self._start = self._end = None

    def start(self) -> None:
        self._start, self._end = self.event_factory(), self.event_factory()
        self._start.record()

    def stop(self) -> float:
        self._end.record()
        self.synchronize()
        return float(self._start.elapsed_time(self._end))


@dataclass(frozen=True)
class LatencyStats:
    """Summary of the timed runs (warm-ups excluded), in milliseconds."""

    median_ms: float
    p90_ms: float
    min_ms: float
    max_ms: float
    runs: int
    warmup: int
    samples_ms: tuple[float, ...]

    @property
    def spread_ms(self) -> float:
        """p90 - median: how far the slow tail sits from the typical run."""
        return self.p90_ms - self.median_ms

    @property
    def iqr_ms(self) -> float:
        """Interquartile range p75 - p25 of the timed runs."""
        return percentile(list(self.samples_ms), 75) - percentile(list(self.samples_ms), 25)

    @property
    def relative_iqr(self) -> float:
        """IQR / median: the spread as a share of the typical run."""
        return self.iqr_ms / self.median_ms if self.median_ms > 0 else math.inf

    @property
    def reliable(self) -> bool:
        """Whether the runs agree well enough (IQR at most :data:`RELIABLE_RELATIVE_IQR` of the median) for the
        median to stand for them."""
        return self.relative_iqr <= RELIABLE_RELATIVE_IQR

    def as_dict(self) -> dict:
        return {**asdict(self), "spread_ms": self.spread_ms, "iqr_ms": self.iqr_ms,
                "relative_iqr": self.relative_iqr, "reliable": self.reliable}

    @classmethod
    def of(cls, samples: Sequence[float], warmup: int) -> "LatencyStats":
        return cls(statistics.median(samples), percentile(list(samples), 90), min(samples), max(samples),
                   len(samples), warmup, tuple(samples))


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default), ``q`` in [0, 100]."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100.0
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def measure_latency(run: Callable[[], object], stopwatch, warmup: int, runs: int,
                    synchronize: Callable[[], None] = lambda: None) -> LatencyStats:
    """Call ``run`` ``warmup`` times untimed (then ``synchronize``), then ``runs`` times, each timed by ``stopwatch``."""
    if runs < 1 or warmup < 0:
        raise ValueError(f"need runs >= 1 and warmup >= 0, got runs={runs}, warmup={warmup}")
    for _ in range(warmup):
        run()
    synchronize()
    samples = []
    for _ in range(runs):
        stopwatch.start()
        run()
        samples.append(stopwatch.stop())
    return LatencyStats.of(samples, warmup)


def measure_interleaved(runs: Sequence[Callable[[], object]], stopwatch, warmup: int, rounds: int,
                        synchronize: Callable[[], None] = lambda: None) -> list[LatencyStats]:
    """Time several models round-robin: ``warmup`` untimed runs of each, then ``rounds`` rounds, each timing every
    model once, the starting model rotated from round to round. A load change during the measurement then reaches
    every model in the same rounds, so sample ``r`` of two models can be compared (their ratio) and each model's
    spread shows the change. Returns one summary per model, sample ``r`` from round ``r``."""
    if rounds < 1 or warmup < 0 or not runs:
        raise ValueError(f"need rounds >= 1, warmup >= 0 and at least one model, got rounds={rounds}, "
                         f"warmup={warmup}, {len(runs)} models")
    for run in runs:
        for _ in range(warmup):
            run()
    synchronize()
    samples: list[list[float]] = [[] for _ in runs]
    for round_index in range(rounds):
        for offset in range(len(runs)):
            model = (round_index + offset) % len(runs)
            stopwatch.start()
            runs[model]()
            samples[model].append(stopwatch.stop())
    return [LatencyStats.of(s, warmup) for s in samples]


def paired_ratio(samples: Sequence[float], reference: Sequence[float]) -> float:
    """Median over rounds of ``samples[r] / reference[r]``: the latency ratio of two interleaved models, each
    round's load cancelling out."""
    return statistics.median(s / r for s, r in zip(samples, reference, strict=True))


def stopwatch_for(device: torch.device):
    """The stopwatch that times ``device`` correctly."""
    return CudaEventStopwatch() if device.type == "cuda" else PerfCounterStopwatch()


def synchronizer_for(device: torch.device) -> Callable[[], None]:
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)


def _release_free_heap() -> None:
    """Return free heap pages to the system where the C library can (glibc ``malloc_trim``); a no-op elsewhere."""
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak memory of the runs inside the ``with`` block, in MiB.

    CUDA: ``max_memory_allocated`` above what was allocated on entry. CPU: the highest resident set seen while the
    block runs, above the resident set on entry, read from ``/proc/self/statm`` by a sampling thread (torch ops
    release the GIL, so it samples during the forward passes). The process-wide ``ru_maxrss`` high-water mark is no
    use here: an earlier, bigger step of the same process would hide every later peak. Where ``/proc`` is missing
    (macOS, Windows) the peak is reported as ``None`` rather than a made-up number. On glibc, free heap memory is
    first handed back to the system (``malloc_trim``): otherwise allocations reuse pages that are already resident
    and the forward pass's peak would not show.
    """

    STATM = "/proc/self/statm"

    def __init__(self, device: torch.device, interval_s: float = 0.0005):
        self.device = device
        self.interval_s = interval_s
        self.peak_mib: float | None = None
        self._page_mib = os.sysconf("SC_PAGE_SIZE") / 2**20 if hasattr(os, "sysconf") else 0.0

    def _rss_mib(self) -> float | None:
        try:
            with open(self.STATM) as handle:
                return int(handle.read().split()[1]) * self._page_mib
        except (OSError, ValueError, IndexError):
            return None

    def _sample(self) -> None:
        while not self._stop.is_set():
            current = self._rss_mib()
            if current is not None:
                self._highest = max(self._highest, current)
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return self
        _release_free_heap()
        self._base = self._rss_mib()
        if self._base is not None:
            self._highest = self._base
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, name="medtl3d-rss-sampler", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mib = (torch.cuda.max_memory_allocated(self.device) - self._base) / 2**20
        elif self._base is not None:
            self._stop.set()
            self._thread.join()
            self.peak_mib = self._highest - self._base
