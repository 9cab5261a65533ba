"""Early termination and statistics of the cutoff search on constructed inputs: the rung schedule, who is promoted
or stopped at a rung (ties, missing folds, undefined scores), rung scores from a trial's history, the budget, the
non-inferior pick and neighbour comparisons on constructed rows (intervals computed by hand), the CLI's budget
option, and the engine's pause (a paused run resumed to the end equals an uninterrupted one)."""

from __future__ import annotations

import math

import pytest
import torch
from monai.data import Dataset
from torch import nn

from medtl3d.engine import load_checkpoint, pause_after, train
from medtl3d.errors import SearchError
from medtl3d.search._rungs import promote, reached, rung_epochs, rung_score
from medtl3d.search._runner import Budget
from medtl3d.search._verdicts import annotate
from medtl3d.search.cli import _budget


# ------------------------------------------------------------------------------------------------ rungs
def test_rung_epochs():
    assert rung_epochs(9, None, 3) == [1, 3, 9]  # default first rung: epochs // eta^2
    assert rung_epochs(27, None, 3) == [3, 9, 27]
    assert rung_epochs(20, None, 3) == [2, 6, 20]  # the last rung is always the trials' epochs ...
    assert rung_epochs(10, None, 3) == [1, 3, 10]  # ... reached by a factor >= eta (no 9 -> 10 rung)
    assert rung_epochs(3, None, 3) == [1, 3]
    assert rung_epochs(2, None, 3) == [2] and rung_epochs(1, None, 3) == [1]  # nothing to stop early
    assert rung_epochs(10, 2, 2) == [2, 4, 10]
    assert rung_epochs(9, 9, 3) == [9]
    with pytest.raises(SearchError, match="eta must be an integer >= 2"):
        rung_epochs(9, None, 1)
    with pytest.raises(SearchError, match=r"min_epochs must be an integer in \[1, epochs=9\]"):
        rung_epochs(9, 10, 3)
    with pytest.raises(SearchError, match="min_epochs"):
        rung_epochs(9, 0, 3)


ORDER = ["a", "b", "c", "d", "e"]


def test_promote_keeps_the_top_third_by_mean():
    scores = {"a": [0.60, 0.70], "b": [0.90, 0.80], "c": [0.50, 0.55], "d": [0.85, 0.86], "e": [0.1, 0.2]}
    assert promote(scores, 3, ORDER) == ["b", "d"]  # ceil(5 / 3) = 2: means b 0.85, d 0.855
    assert promote(scores, 2, ORDER) == ["a", "b", "d"]  # ceil(5 / 2) = 3, returned in the prior's order
    assert promote({"a": [0.5]}, 3, ORDER) == ["a"]  # one candidate: ceil(1/3) = 1 continues


def test_promote_ties_go_to_the_prior_order():
    scores = {"c": [0.8, 0.8], "a": [0.7, 0.9], "e": [0.6, 0.6], "b": [0.3, 0.3]}
    assert promote(scores, 3, ORDER) == ["a", "c"]  # a and c tie at 0.8; ceil(4/3) = 2 keeps both
    assert promote(scores, 4, ORDER) == ["a"]  # one place: a is first in the prior
    assert promote(scores, 4, ["c", "a", "e", "b"]) == ["c"]


def test_promote_missing_folds_and_undefined_scores():
    # a reached the rung on one fold only: its mean is over that fold; d has no defined score: ranked last
    scores = {"a": [0.9], "b": [0.8, 0.85], "c": [0.7, float("nan")], "d": [float("nan")], "e": []}
    assert promote(scores, 2, ORDER) == ["a", "b", "c"]  # ceil(5/2) = 3; c's mean is its finite 0.7
    assert promote({"d": [float("nan")], "e": [], "a": [0.1]}, 3, ORDER) == ["a"]
    with pytest.raises(SearchError, match="outside the search's order: z"):
        promote({"z": [0.5]}, 3, ORDER)


def _record(history, epochs_run, paused):
    return {"history": [{"epoch": e, "val_auroc": v} for e, v in enumerate(history, 1)], "epochs_run": epochs_run,
            "paused": paused}


def test_rung_score_is_the_best_so_far_and_reached_counts_finished_runs():
    record = _record([0.6, float("nan"), 0.8, 0.7], 4, True)
    assert rung_score(record, 1, "auroc") == 0.6
    assert rung_score(record, 2, "auroc") == 0.6  # an undefined epoch does not count
    assert rung_score(record, 9, "auroc") == 0.8
    assert math.isnan(rung_score(_record([float("nan")], 1, True), 1, "auroc"))
    assert reached(record, 3) and not reached(record, 9)
    assert reached(_record([0.6, 0.7], 2, False), 9)  # the engine's early stopping ended it at 2: final


def test_budget_in_epochs_and_device_hours():
    records = [{"epochs_trained": 4, "device_seconds": 1800.0}, {"epochs_trained": 5, "device_seconds": 1800.0}]
    assert Budget().spent(records) is False
    assert Budget(epochs=9).spent(records) and not Budget(epochs=10).spent(records)
    assert Budget(device_hours=1.0).spent(records) and not Budget(device_hours=1.01).spent(records)
    assert _budget("300") == {"budget_epochs": 300.0} == _budget("300epochs")
    assert _budget("2.5h") == {"budget_device_hours": 2.5}
    assert _budget(None) == {}
    with pytest.raises(SearchError, match="--budget 'lots'"):
        _budget("lots")


def test_search_cli_bad_budget_exits_2(capsys):
    from medtl3d.cli import main

    assert main(["search", "--bundle", "bundles/cxr_classification", "--budget", "1 week", "--output",
                 "/tmp/unused"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "medtl3d search: error: --budget '1 week': give epochs (e.g. 300 or 300epochs) or device-hours (e.g. 2.5h)"]


# ------------------------------------------------------------------------------------------------ statistics
def _rows_and_records(scores: dict[str, list[float]], macs: dict[str, float]):
    rows, records = [], {}
    for unit, (label, values) in enumerate(scores.items()):
        strategy = "full" if label == "full" else "truncate"
        rows.append({"label": label, "strategy": strategy, "cut": None if label == "full" else label,
                     "unit": None if label == "full" else unit, "complete": True, "macs_g": macs[label],
                     "val_auroc_mean": sum(values) / len(values)})
        records[label] = [{"fold": f, "seed": 0, "val": {"auroc": v}} for f, v in enumerate(values)]
    return rows, records


SCORES = {"layer1": [0.80, 0.85, 0.70], "layer2": [0.89, 0.91, 0.90], "layer3": [0.90, 0.91, 0.92],
          "full": [0.91, 0.93, 0.89]}
MACS = {"layer1": 0.1, "layer2": 0.2, "layer3": 0.4, "full": 1.0}
# 3 folds: n_test / n_train = 1/2, so the corrected variance factor is 1/3 + 1/2; t(0.975, df=2) = 4.302653
FACTOR, T2 = 1 / 3 + 1 / 2, 4.302653


def test_interval_of_a_mean_is_clipped_to_the_metrics_range():
    rows, records = _rows_and_records({"layer1": [0.96, 1.0, 0.98], "full": [0.90, 0.94, 0.92]},
                                      {"layer1": 0.1, "full": 1.0})
    annotate(rows, records, "auroc", margin=0.02, reference="best", n_train=20, n_test=10, strategies=["truncate"])
    half = T2 * math.sqrt(FACTOR * 4e-4)  # both: sample variance 4e-4; half-width 0.0786
    # layer1: 0.98 +- 0.0786 = [0.9014, 1.0586]: its high end is AUROC's 1; full's [0.8414, 0.9986] is untouched
    assert rows[0]["val_auroc_low"] == pytest.approx(0.98 - half) and rows[0]["val_auroc_high"] == 1.0
    assert rows[1]["val_auroc_high"] == pytest.approx(0.92 + half) and 0.92 + half < 1


def test_noninferior_pick_is_the_cheapest_cut_within_the_margin():
    rows, records = _rows_and_records(SCORES, MACS)
    picks = annotate(rows, records, "auroc", margin=0.02, reference="best", n_train=20, n_test=10,
                     strategies=["truncate"])
    by = {r["label"]: r for r in rows}
    # the best mean is layer3 (0.91, tied with full; the cheaper wins); layer2 - layer3 = [-0.01, 0, -0.02]:
    # mean -0.01, sample variance 1e-4, half-width t * sqrt(factor * 1e-4)
    half = T2 * math.sqrt(FACTOR * 1e-4)
    vs = by["layer2"]["vs_reference"]
    assert vs["reference"] == "layer3" and by["layer3"]["vs_reference"]["verdict"] == "reference"
    assert vs["difference"] == pytest.approx(-0.01) and vs["low"] == pytest.approx(-0.01 - half)
    assert vs["verdict"] == "inconclusive"  # -0.049 < -margin < +0.029: not shown non-inferior
    assert picks == {"truncate": "layer3"}
    # the interval of layer3's mean: 0.91 +- t * sqrt(factor * 1e-4)
    assert by["layer3"]["val_auroc_low"] == pytest.approx(0.91 - half)
    assert by["layer3"]["val_auroc_high"] == pytest.approx(0.91 + half)
    # neighbours: layer2 and layer3 cannot be told apart
    assert by["layer2"]["vs_next"]["relation"] == "indistinguishable from"
    assert by["layer2"]["vs_next"]["next"] == "layer3" and by["layer3"]["vs_next"] is None

    # a shortfall of 0.004..0.006: interval -0.005 +- T2 * sqrt(FACTOR * 1e-6) = [-0.0089, -0.0011], non-inferior
    # at 0.02, so the cheaper layer2 is the pick; at a margin of 0.001 it is inferior and layer3 stays
    shifted = {**SCORES, "layer2": [v - d for v, d in zip(SCORES["layer3"], (0.004, 0.005, 0.006))]}
    rows, records = _rows_and_records(shifted, MACS)
    assert annotate(rows, records, "auroc", margin=0.02, reference="best", n_train=20, n_test=10,
                    strategies=["truncate"]) == {"truncate": "layer2"}
    vs = next(r for r in rows if r["label"] == "layer2")["vs_reference"]
    assert vs["high"] == pytest.approx(-0.005 + T2 * math.sqrt(FACTOR * 1e-6))
    assert next(r for r in rows if r["label"] == "layer2")["vs_next"]["relation"] == "worse than"
    rows, records = _rows_and_records(shifted, MACS)
    assert annotate(rows, records, "auroc", margin=0.001, reference="best", n_train=20, n_test=10,
                    strategies=["truncate"]) == {"truncate": "layer3"}
    assert next(r for r in rows if r["label"] == "layer2")["vs_reference"]["verdict"] == "inferior"


def test_zero_width_interval_gives_no_verdict_and_no_pick():
    """The same shortfall on every fold (a discrete AUROC on a few cases): an interval of zero width at -0.005
    would read non-inferior at margin 0.02 and inferior at 0.001; it is inconclusive at both, never the pick."""
    shifted = {**SCORES, "layer2": [v - 0.005 for v in SCORES["layer3"]]}
    for margin in (0.02, 0.001):
        rows, records = _rows_and_records(shifted, MACS)
        picks = annotate(rows, records, "auroc", margin=margin, reference="best", n_train=20, n_test=10,
                         strategies=["truncate"])
        layer2 = next(r for r in rows if r["label"] == "layer2")
        assert layer2["vs_reference"]["low"] == layer2["vs_reference"]["high"] == pytest.approx(-0.005)
        assert layer2["vs_reference"]["verdict"] == "inconclusive" and picks == {"truncate": "layer3"}
        assert layer2["vs_next"]["relation"] == "indistinguishable from"


def test_noninferior_to_ftl_and_stopped_or_single_run_candidates():
    shortfall = (0.004, 0.005, 0.006)
    rows, records = _rows_and_records({**SCORES, "layer2": [v - d for v, d in zip(SCORES["full"], shortfall)]},
                                      MACS)
    picks = annotate(rows, records, "auroc", margin=0.02, reference="full", n_train=20, n_test=10,
                     strategies=["truncate"])
    assert picks == {"truncate": "layer2"}  # layer2 = FTL - 0.005 +- 0.001
    assert next(r for r in rows if r["label"] == "layer2")["vs_reference"]["reference"] == "full"
    # a candidate stopped at a rung is never compared; one trial per candidate gives no interval and no pick
    rows, records = _rows_and_records(SCORES, MACS)
    rows[1]["complete"] = False
    annotate(rows, records, "auroc", margin=0.02, reference="best", n_train=20, n_test=10, strategies=["truncate"])
    assert rows[1]["vs_reference"] is None and rows[0]["vs_next"]["next"] == "layer3"
    rows, records = _rows_and_records({k: v[:1] for k, v in SCORES.items()}, MACS)
    assert annotate(rows, records, "auroc", margin=0.02, reference="best", n_train=20, n_test=10,
                    strategies=["truncate"]) == {}  # the best is FTL; no cut could be shown non-inferior to it
    assert all(r["val_auroc_low"] is None and r["vs_next"] is None for r in rows)


# ------------------------------------------------------------------------------------------------ engine pause
class _Linear(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 1)

    def forward(self, x):
        return self.fc(x.flatten(1))


def _rows(n, seed):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        image = torch.randn((1, 4, 4), generator=g) + (i % 2)
        rows.append({"image": image, "label": i % 2, "id": f"case{i}"})
    return Dataset(rows)


def _train(folder):
    torch.manual_seed(0)
    return train(_Linear(), _rows(16, 1), _rows(8, 2), task="binary", output_dir=folder, epochs=3, lr=0.05,
                 batch_size=4, progress=False, tensorboard=False, scheduler="cosine", warmup_epochs=1)


def test_a_paused_run_resumes_to_the_end_as_if_never_paused(tmp_path):
    straight = _train(tmp_path / "straight")
    with pause_after(1):
        paused = _train(tmp_path / "paused")
    assert paused.epochs_run == 1
    state = load_checkpoint(tmp_path / "paused" / "last.pt")
    assert state["engine"]["epoch"] == 1 and state["stopped_early"] is False  # a pause, not an early stop
    with pause_after(1):  # already there: nothing trains
        assert _train(tmp_path / "paused").epochs_run == 1
    resumed = _train(tmp_path / "paused")
    assert resumed.epochs_run == 3
    strip = lambda history: [{k: v for k, v in h.items() if k != "seconds"} for h in history]  # noqa: E731
    assert strip(resumed.history) == strip(straight.history)
    a = load_checkpoint(tmp_path / "straight" / "last.pt")
    b = load_checkpoint(tmp_path / "paused" / "last.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])  # the schedule spanned 3 epochs
