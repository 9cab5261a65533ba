"""Efficiency reports: published counts, counter agreement over the registry, monotone truncation, the timer's
logic (with fake clocks), clear errors on bad input, the written reports and the CLI."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from torch import nn

from medtl3d.backbones import build_backbone, get_entry, list_backbones
from medtl3d.cli import main
from medtl3d.efficiency import EfficiencyReport, EfficiencyRow, count_macs, efficiency_report, measure_latency
from medtl3d.efficiency._counting import AGREEMENT_TOLERANCE
from medtl3d.efficiency._timing import (
    CudaEventStopwatch,
    PerfCounterStopwatch,
    measure_interleaved,
    paired_ratio,
    percentile,
)
from medtl3d.errors import EfficiencyError, UnknownCutPointError


# "About" 2.87 G / 0.31 G are fvcore's defaults, which count batch norms; norms excluded, the counts are 2.837 G and
# 0.301 G (1.2% and 3% lower), hence the wider bands there.
@pytest.mark.parametrize("name, params_m, gmacs", [
    ("resnet50", (25.55, 25.57), (4.09, 4.12)),
    ("densenet121", (7.97, 7.99), (2.81, 2.93)),
    ("mobilenet_v2", (3.50, 3.51), (0.298, 0.322)),
])
def test_full_model_matches_published_counts(name, params_m, gmacs):
    report = efficiency_report(name, cuts=[], input_shape="3x224x224", runs=0, num_classes=1000)
    (full,) = report.full
    assert params_m[0] <= full.params_m <= params_m[1]
    assert gmacs[0] <= full.macs_g <= gmacs[1]
    assert abs(full.mac_difference_pct) <= 100 * AGREEMENT_TOLERANCE


@pytest.fixture(scope="module")
def registry_reports():
    """Count-only truncate reports at each backbone's smallest valid input, every block cut (computed once)."""
    reports = {}
    for name in list_backbones():
        entry = get_entry(name)
        dims = entry.spatial_dims[0]
        shape = (entry.in_channels, *entry.min_input[dims])
        reports[name] = efficiency_report(name, "truncate", "block", shape, runs=0)
    return reports


@pytest.mark.slow
def test_counters_agree_or_the_report_names_why(registry_reports):
    for name, report in registry_reports.items():
        for row in report.rows:
            if abs(row.mac_difference_pct) > 100 * AGREEMENT_TOLERANCE:
                assert row.mac_difference_ops and "UNEXPLAINED" not in row.mac_difference_ops, (name, row.cut)
            assert row.macs_g > 0, (name, row.cut)


@pytest.mark.slow
def test_truncation_never_grows_as_the_cut_moves_earlier(registry_reports):
    for name, report in registry_reports.items():
        rows = report.rows_for(strategy="truncate")
        assert [r.cut for r in rows] == [c.name for c in build_backbone(name).cut_points_at("block")]
        for earlier, later in zip(rows, rows[1:]):
            assert earlier.params <= later.params and earlier.macs_g <= later.macs_g, (name, earlier.cut)
        assert rows[-1].params <= report.full[0].params


def test_transfusion_has_fewer_params_than_full():
    report = efficiency_report("resnet18", "transfusion", ["layer2", "layer3"], "3x32x32", runs=0)
    full = report.full[0]
    rows = report.rows_for(strategy="transfusion")
    assert len(rows) == 2 and all(r.params < full.params and r.params_ratio < 1 for r in rows)


def test_pooling_is_counted_by_rule_and_explains_the_difference():
    model = nn.Sequential(nn.Conv3d(1, 1, 1, bias=False), nn.MaxPool3d(2), nn.Upsample(scale_factor=2,
                          mode="trilinear"), nn.AdaptiveAvgPool3d(1))
    count = count_macs(model, torch.randn(1, 1, 8, 8, 8), "toy")
    assert count.fvcore_by_op == {"conv": 512, "max_pool3d": 64 * 8, "upsample_trilinear3d": 512 * 8,
                                  "adaptive_avg_pool3d": 512}
    assert count.flop_counter == 512
    assert set(count.explaining_ops) == {"max_pool3d", "upsample_trilinear3d", "adaptive_avg_pool3d"}
    assert count.explained and "max_pool3d" in count.difference_note()


# ----------------------------------------------------------------- timer
class FakeClock:
    """perf_counter stand-in: each run advances time by the next scripted duration (seconds)."""

    def __init__(self, durations):
        self.durations, self.now, self.reads = list(durations), 0.0, 0

    def __call__(self) -> float:
        self.reads += 1
        return self.now

    def run(self) -> None:
        self.now += self.durations.pop(0)


def test_warmups_are_excluded_and_spread_reported():
    clock = FakeClock([9.0, 9.0] + [0.001 * d for d in (5, 1, 3, 2, 4, 10, 6, 7, 8, 9)])
    stats = measure_latency(clock.run, PerfCounterStopwatch(clock), warmup=2, runs=10)
    assert stats.samples_ms == pytest.approx((5, 1, 3, 2, 4, 10, 6, 7, 8, 9))
    assert stats.median_ms == pytest.approx(5.5) and stats.p90_ms == pytest.approx(9.1)
    assert (stats.min_ms, stats.max_ms) == pytest.approx((1, 10)) and stats.spread_ms == pytest.approx(3.6)
    assert clock.reads == 20 and not clock.durations


class LoadedMachine:
    """A clock and models on a machine whose load triples once ``switch_s`` seconds have passed: every run takes
    its model's base time, times 3 after the switch."""

    def __init__(self, base_ms, switch_s):
        self.now, self.switch_s, self.calls = 0.0, switch_s, []
        self.models = [self._model(i, ms) for i, ms in enumerate(base_ms)]

    def _model(self, index, ms):
        def run():
            self.calls.append(index)
            self.now += ms / 1000.0 * (3.0 if self.now >= self.switch_s else 1.0)
        return run

    def __call__(self) -> float:
        return self.now


def test_interleaved_timing_lets_a_load_change_hit_every_model_alike():
    # base 1, 2 and 4 ms; warm-ups take 14 ms, the load triples 40 ms in: halfway through 8 rounds of 7 ms
    machine = LoadedMachine([1.0, 2.0, 4.0], switch_s=0.040)
    stats = measure_interleaved(machine.models, PerfCounterStopwatch(machine), warmup=2, rounds=8)
    assert machine.calls[:6] == [0, 0, 1, 1, 2, 2]  # warm-ups first
    assert machine.calls[6:12] == [0, 1, 2, 1, 2, 0]  # then one run each per round, the first model rotating
    for stat, base in zip(stats, (1.0, 2.0, 4.0)):
        assert stat.samples_ms == pytest.approx((base,) * 4 + (3 * base,) * 4)  # the same rounds slowed down
        assert stat.warmup == 2 and stat.runs == 8
        # a threefold step: IQR = p75 - p25 = 3b - b = 2b, as large as the median 2b: flagged unreliable
        assert stat.iqr_ms == pytest.approx(2 * base) and stat.relative_iqr == pytest.approx(1.0)
        assert not stat.reliable and not stat.as_dict()["reliable"]
    # round by round, the load cancels: the ratios are exact
    assert paired_ratio(stats[2].samples_ms, stats[0].samples_ms) == pytest.approx(4.0)
    assert paired_ratio(stats[1].samples_ms, stats[0].samples_ms) == pytest.approx(2.0)

    # timed one model after the other, the last model takes the whole load change: its ratio is off by 3
    machine = LoadedMachine([1.0, 2.0, 4.0], switch_s=0.030)
    sequential = [measure_latency(run, PerfCounterStopwatch(machine), 0, 8) for run in machine.models]
    assert sequential[2].median_ms / sequential[0].median_ms == pytest.approx(12.0)


def test_steady_timings_are_reliable():
    machine = LoadedMachine([1.0, 2.0], switch_s=float("inf"))
    stats = measure_interleaved(machine.models, PerfCounterStopwatch(machine), warmup=0, rounds=5)
    assert all(s.reliable and s.iqr_ms == pytest.approx(0.0) for s in stats)
    with pytest.raises(ValueError, match="rounds >= 1"):
        measure_interleaved(machine.models, PerfCounterStopwatch(machine), warmup=0, rounds=0)


def test_report_shows_the_spread_and_flags_unreliable_latency(tmp_path):
    report = efficiency_report("resnet18", "truncate", ["stem", "layer1"], "3x32x32", runs=4, warmup=1)
    for row in report.rows:
        assert row.latency_iqr_ms >= 0 and row.latency_reliable == (row.latency_relative_iqr <= 0.25)
    assert report.rows[0].latency_ratio == 1.0 and "interleaved" in report.metadata["schedule"]
    assert "| IQR (ms) | reliable |" in report.to_markdown()
    base = dict(backbone="b", strategy="truncate", level="block", is_full=False, batch=1, params=1, params_m=1e-6,
                macs_g=1.0, flop_counter_macs_g=1.0, mac_difference_pct=0.0, mac_difference_ops="",
                unsupported_ops="", latency_median_ms=150.0, latency_iqr_ms=60.0, latency_relative_iqr=0.4)
    rows = [EfficiencyRow(cut="full", **{**base, "is_full": True}, latency_reliable=True),
            EfficiencyRow(cut="layer2", **base, latency_reliable=False)]
    markdown = EfficiencyReport(rows, {**report.metadata, "backbone": "b"}).to_markdown()
    assert "| 150 | - | 60 | no |" in markdown and "latency unreliable" in markdown and "layer2 (truncate, batch 1)" in markdown
    assert "full (truncate" not in markdown.split("latency unreliable")[1]
    EfficiencyReport(rows, {**report.metadata, "backbone": "b"}).write_csv(tmp_path / "rows.csv")
    written = list(csv.DictReader(open(tmp_path / "rows.csv")))
    assert [r["latency_reliable"] for r in written] == ["True", "False"] and written[1]["latency_iqr_ms"] == "60.0"


def test_percentile_matches_numpy_linear():
    assert percentile([1, 2, 3, 4], 90) == pytest.approx(3.7)
    assert percentile([7], 90) == 7


def test_gpu_stopwatch_synchronises_before_reading():
    calls = []

    class FakeEvent:
        def __init__(self):
            self.time = None

        def record(self):
            calls.append("record")
            self.time = len(calls)

        def elapsed_time(self, end):
            assert calls[-1] == "sync", "events read before synchronising"
            return float(end.time - self.time)

    stopwatch = CudaEventStopwatch(FakeEvent, lambda: calls.append("sync"))
    stats = measure_latency(lambda: calls.append("run"), stopwatch, warmup=1, runs=2,
                            synchronize=lambda: calls.append("sync"))
    assert calls == ["run", "sync"] + ["record", "run", "record", "sync"] * 2
    assert stats.samples_ms == (2.0, 2.0)


def test_cpu_report_states_threads_and_timer(tmp_path):
    report = efficiency_report("resnet18", "truncate", ["stem"], "3x32x32", runs=3, warmup=1)
    assert report.metadata["threads"] == torch.get_num_threads()
    assert report.metadata["timer"] == "time.perf_counter"
    assert all(r.latency_median_ms > 0 and r.latency_p90_ms >= r.latency_median_ms for r in report.rows)
    assert all(r.throughput_per_s > 0 and r.peak_memory_mib >= 0 for r in report.rows)


def test_cpu_peak_memory_sees_a_forward_allocation():
    """A forward pass that allocates 64 MiB must show up, even after the process already peaked higher."""
    from medtl3d.efficiency._timing import PeakMemory

    earlier_peak = torch.ones(2**28 // 4)  # 256 MiB: ru_maxrss would hide every later, smaller peak
    del earlier_peak

    class Allocates(nn.Module):
        def forward(self, x):
            return torch.ones(2**26 // 4).sum()  # 64 MiB

    with PeakMemory(torch.device("cpu")) as memory:
        measure_latency(lambda: Allocates()(None), PerfCounterStopwatch(), warmup=0, runs=3)
    assert 56 <= memory.peak_mib <= 200


def test_low_precision_and_channels_last_paths_run_on_cpu():
    """AMP (bfloat16 autocast on CPU), a bfloat16 model and channels-last memory format all time and are stated."""
    for options in ({"amp": True}, {"dtype": "bfloat16"}, {"channels_last": True}):
        report = efficiency_report("resnet18", "truncate", ["layer1"], "3x32x32", runs=2, warmup=1, **options)
        assert all(r.latency_median_ms > 0 for r in report.rows), options
        for key, value in options.items():
            assert report.metadata[key] == value
    volume = efficiency_report("resnet18", "truncate", ["layer1"], "1x32x32x32", runs=1, warmup=0,
                               channels_last=True)
    assert volume.metadata["spatial_dims"] == 3 and all(r.latency_median_ms > 0 for r in volume.rows)


# ----------------------------------------------------------------- bad input
def test_input_too_small_is_a_clear_error():
    with pytest.raises(EfficiencyError, match=r"too small for resnet18.*32x32"):
        efficiency_report("resnet18", input_shape="3x16x16", runs=0)


def test_runtime_shape_error_names_model_and_shape():
    backbone = build_backbone("inception_v3")
    backbone.name = "unregistered_inception"  # no registry minimum: the forward pass must catch it
    with pytest.raises(EfficiencyError, match=r"unregistered_inception \(full model\) cannot run on input 3x8x8"):
        efficiency_report(backbone, input_shape="3x8x8", runs=0)


def test_unknown_cut_point_is_a_clear_error():
    with pytest.raises(UnknownCutPointError, match="layer9.*Block cut points"):
        efficiency_report("resnet18", cuts=["layer9"], input_shape="3x32x32", runs=0)


def test_missing_device_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # any machine, GPU or not, runs this
    with pytest.raises(EfficiencyError, match="'cuda' is not available"):
        efficiency_report("resnet18", input_shape="3x32x32", device="cuda")


def test_untraceable_model_is_a_clear_error():
    class ReturnsList(nn.Module):
        def forward(self, x):
            return x.tolist()

    with pytest.raises(EfficiencyError, match="fvcore cannot trace toy-list"):
        count_macs(ReturnsList(), torch.randn(1, 3), "toy-list")


# ----------------------------------------------------------------- outputs
def test_reports_written_with_rows_and_context(tmp_path):
    report = efficiency_report("resnet18", "truncate", "block", "3x32x32", batch_sizes=(1, 2), runs=1, warmup=0,
                               output_dir=tmp_path)
    stem = tmp_path / "resnet18_truncate"
    rows = list(csv.DictReader(open(f"{stem}.csv")))
    assert len(rows) == len(report.rows) == 2 * (1 + 5)
    assert {r["cut"] for r in rows} == {"stem", "layer1", "layer2", "layer3", "layer4"}
    document = json.loads(open(f"{stem}.json").read())
    meta = document["metadata"]
    for key in ("device_name", "torch", "cuda", "threads", "input_shape", "batch_sizes", "dtype", "mac_convention"):
        assert key in meta
    assert meta["input_shape"] == "3x32x32" and meta["batch_sizes"] == [1, 2]
    assert len(document["rows"]) == len(rows)
    markdown = open(f"{stem}.md").read()
    assert "(full model)" in markdown and markdown.count("| truncate |") == 10
    assert open(f"{stem}.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_cli_runs_end_to_end(tmp_path, capsys):
    code = main(["efficiency", "resnet18", "--cuts", "stem,layer1", "--input", "3x32x32", "--runs", "2",
                 "--warmup", "1", "--output", str(tmp_path)])
    assert code == 0
    assert "| truncate | layer1 | 1 |" in capsys.readouterr().out
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".csv", ".json", ".md", ".png"]


def test_cli_bad_device_is_one_line(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # any machine, GPU or not, runs this
    assert main(["efficiency", "resnet18", "--device", "cuda", "--input", "3x32x32"]) == 2
    assert capsys.readouterr().err.startswith("medtl3d: error: device 'cuda' is not available")
