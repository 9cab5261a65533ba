"""Cutoff search: the plan (Stage 1 block cuts, Stage 2 neighbourhoods at the first, middle and last blocks), the
results store (resume, torn lines, foreign configurations refused), a whole hierarchical search on tiny phantom CXRs
through the real bundle (expected candidates, picks, report files, probes), kill-and-resume ending with the same
table, a trial interrupted mid-training continuing from its checkpoint, early termination (who continues at each
rung, a budget and a larger one continuing it, a kill between rungs re-training nothing finished or stopped, the Ray
executor making the same decisions run by run), the bundle's search.yaml and the bad-input errors."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from medtl3d.backbones import build_backbone
from medtl3d.errors import SearchError
from medtl3d.search import (ResultsStore, neighbourhood, pareto_front, run_search, spearman, stage1_cuts,
                            stage2_cuts)

REPO = Path(__file__).resolve().parents[1]
CXR = REPO / "bundles" / "cxr_classification"
TINY = {"backbone": "resnet18", "weights": "null", "epochs": 1, "phantom_cases": 20, "phantom_size": 32,
        "image_size": 32,
        "batch_size": 8, "amp": False, "tensorboard": False, "device": "cpu", "n_folds": 2}
FAST = dict(efficiency_runs=1, efficiency_warmup=0, evaluate_test=False, cpus_per_trial=1)
# resnet18 cut points by unit: stem 0 | layer1.0 1, layer1(.1) 2 | layer2.0 3, layer2 4 | layer3.0 5, layer3 6 |
# layer4.0 7, layer4 8. Truncating at layer4 is the full backbone (FTL), so truncate's blocks stop at layer3.
STAGE2_TRUNCATE = {"stem": ["layer1.0"], "layer1": ["layer1.0", "layer2.0"], "layer2": ["layer2.0", "layer3.0"],
                   "layer3": ["layer3.0", "layer4.0"]}


@pytest.fixture(scope="module")
def resnet18():
    with torch.device("meta"):
        return build_backbone("resnet18", 2)


# ------------------------------------------------------------------------------------------------ plan
def test_stage1_cuts_per_strategy(resnet18):
    names = lambda cuts: [c.name for c in cuts]  # noqa: E731
    assert names(stage1_cuts(resnet18, "truncate")) == ["stem", "layer1", "layer2", "layer3"]
    assert names(stage1_cuts(resnet18, "transfusion")) == ["stem", "layer1", "layer2", "layer3"]
    assert names(stage1_cuts(resnet18, "lwft")) == ["stem", "layer1", "layer2", "layer3", "layer4"]
    exhaustive = stage1_cuts(resnet18, "truncate", "all")  # one per unit (block names first), last unit (FTL) out
    assert names(exhaustive) == ["stem", "layer1.0", "layer1", "layer2.0", "layer2", "layer3.0", "layer3",
                                 "layer4.0"]


def test_neighbourhood_first_middle_last_blocks(resnet18):
    names = lambda cuts: [c.name for c in cuts]  # noqa: E731
    assert names(neighbourhood(resnet18, "stem")) == ["stem", "layer1.0", "layer1"]  # first: no block before it
    assert names(neighbourhood(resnet18, "layer2")) == ["layer2.0", "layer2", "layer3.0", "layer3"]
    assert names(neighbourhood(resnet18, "layer4")) == ["layer4.0", "layer4"]  # last: no block after it
    assert names(neighbourhood(resnet18, "layer2", width=2)) == [
        "layer1.0", "layer1", "layer2.0", "layer2", "layer3.0", "layer3", "layer4.0", "layer4"]
    blocks = {c.unit for c in stage1_cuts(resnet18, "lwft")}
    assert names(stage2_cuts(resnet18, "lwft", "stem", blocks)) == ["layer1.0"]
    assert names(stage2_cuts(resnet18, "lwft", "layer4", blocks)) == ["layer4.0"]
    truncate_blocks = {c.unit for c in stage1_cuts(resnet18, "truncate")}
    for best, expected in STAGE2_TRUNCATE.items():
        assert names(stage2_cuts(resnet18, "truncate", best, truncate_blocks)) == expected
    with pytest.raises(SearchError, match="neighbourhood must be >= 1"):
        neighbourhood(resnet18, "layer2", width=0)


def test_stage2_on_a_3d_backbone():
    with torch.device("meta"):
        body = build_backbone("mobilenet_v2", 3)
    blocks = {c.unit for c in stage1_cuts(body, "truncate")}
    assert [c.name for c in stage2_cuts(body, "truncate", "stage3", blocks)] == [
        "features.4", "features.5", "features.7", "features.8", "features.9"]


def test_empty_cut_set_and_unknown_cut(resnet18):
    with pytest.raises(SearchError, match="no cut point to search"):
        stage1_cuts(resnet18, "truncate", [])
    with pytest.raises(SearchError, match="no cut point to search"):
        stage1_cuts(resnet18, "transfusion", ["layer4"])  # nothing above the last unit to slim
    with pytest.raises(SearchError, match="layer9"):
        stage1_cuts(resnet18, "truncate", ["layer9"])


def test_spearman_and_pareto_front():
    assert spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)  # 1 - 6*2/(4*15)
    assert spearman([1, 2, 3, 4], [40, 30, 20, 10]) == pytest.approx(-1.0)
    assert math.isnan(spearman([1, 2], [1, 2]))
    rows = [{"c": 1.0, "m": 0.5}, {"c": 2.0, "m": 0.4}, {"c": 3.0, "m": 0.9}, {"c": 0.5, "m": 0.2}]
    assert pareto_front(rows, "c", "m") == [rows[3], rows[0], rows[2]]


# ------------------------------------------------------------------------------------------------ store
def test_store_resumes_drops_torn_line_and_refuses_other_configs(tmp_path):
    path = tmp_path / "trials.jsonl"
    store = ResultsStore(path, {"epochs": 1, "seeds": [0]})
    store.add({"kind": "trial", "key": "a", "val": {"auroc": 0.7}})
    with open(path, "ab") as handle:  # a kill in the middle of a write
        handle.write(b'{"kind": "trial", "key": "b", "va')
    again = ResultsStore(path, {"seeds": [0], "epochs": 1})
    assert [r["key"] for r in again.of_kind("trial")] == ["a"]
    again.add({"kind": "trial", "key": "c", "val": {}})
    assert [json.loads(line)["key"] for line in path.read_text().splitlines()[1:]] == ["a", "c"]
    with pytest.raises(SearchError, match=r"different search configuration \(epochs: 1 in the store, 2 now"):
        ResultsStore(path, {"epochs": 2, "seeds": [0]})
    (tmp_path / "other.jsonl").write_text('{"kind": "trial"}\n')
    with pytest.raises(SearchError, match="not a medtl3d search results store"):
        ResultsStore(tmp_path / "other.jsonl", {})


# ------------------------------------------------------------------------------------------------ whole search
@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    out = tmp_path_factory.mktemp("search")
    result = run_search(CXR, out, overrides=TINY, strategies=["truncate"], probe=True, **FAST)
    return out, result


def _metrics_table(rows):
    return {r["label"]: (r["stage"], r["n"], round(r["val_auroc_mean"], 12), round(r["val_auroc_std"], 12))
            for r in rows}


@pytest.mark.slow
def test_hierarchical_search_trains_exactly_the_expected_candidates(searched):
    out, result = searched
    stage1 = {"full", "truncate@stem", "truncate@layer1", "truncate@layer2", "truncate@layer3"}
    best1 = result.picks["TTL-1"]
    expected2 = {f"truncate@{c}" for c in STAGE2_TRUNCATE[best1.split("@")[1]]}
    assert {r["label"] for r in result.rows if r["stage"] == 1} == stage1
    assert {r["label"] for r in result.rows if r["stage"] == 2} == expected2
    assert result.trained == (len(stage1) + len(expected2)) * 2 and result.reused == 0
    trials = [json.loads(line) for line in (out / "trials.jsonl").read_text().splitlines()[1:]]
    trials = [t for t in trials if t["kind"] == "trial"]
    assert sorted(t["key"] for t in trials) == sorted(f"{label}/fold{f}/seed0" for label in stage1 | expected2
                                                      for f in (0, 1))
    # TTL-1 is the best block cut on mean validation AUROC; TTL-2 the best over both stages
    block = [r for r in result.rows if r["strategy"] == "truncate" and r["stage"] == 1]
    assert result.row(best1)["val_auroc_mean"] == max(r["val_auroc_mean"] for r in block)
    every = [r for r in result.rows if r["strategy"] == "truncate"]
    assert result.row(result.picks["TTL-2"])["val_auroc_mean"] == max(r["val_auroc_mean"] for r in every)
    for row in result.rows:  # mean/std over the two folds of the stored trials
        values = [t["val"]["auroc"] for t in trials if t["key"].startswith(row["label"] + "/")]
        assert row["val_auroc_mean"] == pytest.approx(sum(values) / 2)
        assert row["val_auroc_std"] == pytest.approx(abs(values[0] - values[1]) / math.sqrt(2))


@pytest.mark.slow
def test_report_files_costs_and_probes(searched):
    out, result = searched
    for name in ("search_report.csv", "search_report.json", "search_report.md", "search_pareto.png",
                 "search_cuts.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    with open(out / "search_report.csv") as handle:
        rows = {r["label"]: r for r in csv.DictReader(handle)}
    assert float(rows["truncate@stem"]["macs_g"]) < float(rows["truncate@layer2"]["macs_g"]) < \
        float(rows["full"]["macs_g"])
    assert float(rows["full"]["params_m"]) == pytest.approx(11.18, abs=0.01)  # resnet18 without its 1000-class head
    markdown = (out / "search_report.md").read_text()
    assert "**TTL-1**" in markdown and "**TTL-2**" in markdown and "Spearman" in markdown
    report = json.loads((out / "search_report.json").read_text())
    assert report["picks"]["FTL"] == "full"
    # probes: one row per cut unit, AUROCs in [0, 1], their correlation with the fine-tuned result reported
    assert [p["unit"] for p in result.probes] == list(range(9))
    assert all(0.0 <= p["linear_auroc"] <= 1.0 and 0.0 <= p["knn_auroc"] <= 1.0 for p in result.probes)
    assert set(report["metadata"]["spearman"]["truncate"]) == {"knn", "linear"}
    assert sorted(p.name for p in (out / "probe_cache").glob("*.pt")) == sorted(
        f"{p['cut']}.pt" for p in result.probes)


@pytest.mark.slow
def test_rerun_trains_nothing_and_probe_top_m(searched, tmp_path, one_thread):
    out, result = searched
    again = run_search(CXR, out, overrides=TINY, strategies=["truncate"], probe=True, **FAST)
    assert again.trained == 0 and again.reused == result.trained
    assert _metrics_table(again.rows) == _metrics_table(result.rows)
    with pytest.raises(SearchError, match="overrides.epochs"):
        run_search(CXR, out, overrides={**TINY, "epochs": 2}, strategies=["truncate"], probe=True, **FAST)
    top = run_search(CXR, tmp_path, overrides=TINY, strategies=["truncate"], probe_top_m=2, stage2=False, **FAST)
    score = {p["cut"]: p["linear_auroc"] for p in top.probes}
    blocks = ["stem", "layer1", "layer2", "layer3"]
    expected = sorted(blocks, key=lambda c: -score[c])[:2]
    assert {r["cut"] for r in top.rows if r["strategy"] == "truncate"} == set(expected)
    assert top.trained == (1 + 2) * 2


def _kill_search_after(out: Path, overrides: dict, records: int) -> list[dict]:
    """Run the search of ``overrides`` into ``out`` in a subprocess and SIGKILL it once its store holds
    ``records`` trial records (mid-trial, whatever runs then); returns the records it left."""
    script = (f"from medtl3d.search import run_search\n"
              f"run_search({str(CXR)!r}, {str(out)!r}, overrides={overrides!r}, strategies=['truncate'], "
              f"probe=True, **{FAST!r})\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    store = out / "trials.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if store.is_file() and sum('"kind": "trial"' in line for line in store.read_text().splitlines()) >= records:
            break
        time.sleep(0.2)
    assert process.poll() is None, "the search ended before it could be killed"
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    return [r for r in map(json.loads, store.read_text().splitlines()[1:]) if r["kind"] == "trial"]


@pytest.mark.slow
def test_killed_search_resumes_to_the_same_table(searched, tmp_path):
    out, result = searched
    finished = len(_kill_search_after(tmp_path, TINY, 3))
    assert 3 <= finished < result.trained
    resumed = run_search(CXR, tmp_path, overrides=TINY, strategies=["truncate"], probe=True, **FAST)
    assert resumed.reused == finished and resumed.trained == result.trained - finished
    assert _metrics_table(resumed.rows) == _metrics_table(result.rows)  # the same table as the uninterrupted run
    assert resumed.picks == result.picks


# ------------------------------------------------------------------------------------------------ early termination
ES = {**TINY, "epochs": 3}  # eta 3: rungs at 1 and 3 epochs


@pytest.fixture(scope="module")
def searched_es(tmp_path_factory):
    out = tmp_path_factory.mktemp("search_es")
    return out, run_search(CXR, out, overrides=ES, strategies=["truncate"], probe=True, **FAST)


def _decisions(rows):
    return {r["label"]: (r["status"], r["epochs"]) for r in rows}


def _trial_runs(out: Path) -> list[tuple]:
    """Every run the store recorded: (trial, stage, epochs reached, continued from a checkpoint), in any order."""
    return sorted((r["key"], r["stage"], r["epochs_run"], r["resumed"])
                  for r in map(json.loads, (out / "trials.jsonl").read_text().splitlines()[1:]) if r["kind"] == "trial")


@pytest.mark.slow
def test_early_stopping_keeps_the_top_third_at_each_rung(searched_es):
    out, result = searched_es
    records = [r for r in map(json.loads, (out / "trials.jsonl").read_text().splitlines()[1:]) if r["kind"] == "trial"]
    first = {}  # each trial's record at rung 1 (its first record)
    for record in records:
        first.setdefault(record["key"], record)
    latest = {r["key"]: r for r in records}
    linear = {p["cut"]: p["linear_auroc"] for p in result.probes}
    # stage 1: FTL straight to the end; the 4 block cuts to epoch 1, then the top ceil(4/3) = 2 on the mean over
    # both folds of the epoch-1 validation AUROC (ties to the better probe score) continue to epoch 3
    assert [first[f"full/fold{f}/seed0"]["epochs_run"] for f in (0, 1)] == [3, 3]
    blocks = ["stem", "layer1", "layer2", "layer3"]
    rung1 = {c: sum(first[f"truncate@{c}/fold{f}/seed0"]["history"][0]["val_auroc"] for f in (0, 1)) / 2
             for c in blocks}
    assert all(first[f"truncate@{c}/fold{f}/seed0"]["epochs_run"] == 1 for c in blocks for f in (0, 1))
    promoted = sorted(blocks, key=lambda c: (-rung1[c], -linear[c]))[:2]
    for cut in blocks:
        row = result.row(f"truncate@{cut}")
        folder = out / "trials" / f"truncate_{cut}" / "fold0_seed0" / "train"
        if cut in promoted:
            assert row["status"] == "complete" and latest[f"truncate@{cut}/fold0/seed0"]["resumed"]
            assert not (folder / "last.pt").exists()  # finished: the engine state is dropped
        else:
            assert row["status"] == "stopped at rung 1 (1 epochs)" and row["epochs"] == 1
            assert (folder / "last.pt").is_file()  # kept: a larger budget continues it
    assert result.picks["TTL-1"] in {f"truncate@{c}" for c in promoted}
    # cost: every epoch counted once; FTL 2 x 3, stage 1 rung 1: 4 x 2 x 1, rung 2: 2 x 2 x 2, then stage 2
    assert result.cost["epochs"] == sum(r["epochs_trained"] for r in records)
    assert sum(r["epochs_trained"] for r in records if r["stage"] == 1) == 6 + 8 + 8
    assert result.cost["exhaustive_epochs"] == 9 * 2 * 3 and result.cost["epochs_fraction"] < 1
    markdown = (out / "search_report.md").read_text()
    assert "successive halving at 1, 3 epochs" in markdown
    # the non-inferior pick is stated either way (which one it is depends on learned scores)
    assert ("**TTL-NI**" in markdown) if "TTL-NI" in result.picks else ("so there is no TTL-NI" in markdown)


@pytest.mark.slow
def test_budget_stops_the_search_and_a_larger_budget_continues_it(searched_es, tmp_path):
    out, result = searched_es
    # FTL (2 x 3 epochs) and rung 1 (4 x 2 x 1) spend 14 epochs: nothing more starts
    short = run_search(CXR, tmp_path, overrides=ES, strategies=["truncate"], probe=True, budget_epochs=14, **FAST)
    assert short.cost["epochs"] == 14 and short.trained == 10
    assert {r["status"] for r in short.rows if r["stage"] == 1 and r["cut"]} == {"stopped at rung 1 (1 epochs)"}
    assert {r["status"] for r in short.rows if r["stage"] == 2} == {"not started"}
    assert "The budget was reached" in (tmp_path / "search_report.md").read_text()
    longer = run_search(CXR, tmp_path, overrides=ES, strategies=["truncate"], probe=True, **FAST)
    assert longer.cost["epochs"] == result.cost["epochs"]
    seen = set()
    for record in [r for r in map(json.loads, (tmp_path / "trials.jsonl").read_text().splitlines()[1:])
                   if r["kind"] == "trial"]:  # every later record of a trial continued it from its checkpoint
        assert record["resumed"] == (record["key"] in seen), record["key"]
        seen.add(record["key"])
    assert _decisions(longer.rows) == _decisions(result.rows)
    assert _metrics_table(longer.rows) == _metrics_table(result.rows) and longer.picks == result.picks


@pytest.mark.slow
def test_killed_early_stopping_search_retrains_nothing_finished_or_stopped(searched_es, tmp_path):
    """Killed in Stage 1's second rung (after FTL and every block cut's rung 1), the re-run trains only what is
    missing: no trial trains again to an epoch it was recorded at, a trial with a record continues from its
    checkpoint, and the search ends with the uninterrupted one's decisions, scores and cost."""
    out, result = searched_es
    records = [r for r in map(json.loads, (out / "trials.jsonl").read_text().splitlines()[1:]) if r["kind"] == "trial"]
    before = _kill_search_after(tmp_path, ES, 2 + 8 + 1)  # FTL 2 + rung 1: 4 block cuts x 2 folds + one more
    assert 11 <= len(before) < len(records)
    resumed = run_search(CXR, tmp_path, overrides=ES, strategies=["truncate"], probe=True, **FAST)
    after = [r for r in map(json.loads, (tmp_path / "trials.jsonl").read_text().splitlines()[1:])
             if r["kind"] == "trial"]
    assert after[:len(before)] == before and resumed.trained == len(records) - len(before)
    reached = {}
    for record in before:
        reached[record["key"]] = record["epochs_run"]
    for record in after[len(before):]:
        assert record["epochs_run"] > reached.get(record["key"], 0), record["key"]  # not trained again
        assert record["resumed"] or record["key"] not in reached, record["key"]  # from its checkpoint
        reached[record["key"]] = record["epochs_run"]
    stopped = [r["label"] for r in result.rows if r["status"].startswith("stopped")]
    assert stopped and all(reached[f"{label}/fold{f}/seed0"] == 1 for label in stopped for f in (0, 1))
    assert resumed.cost["epochs"] == result.cost["epochs"]
    assert _decisions(resumed.rows) == _decisions(result.rows)
    assert _metrics_table(resumed.rows) == _metrics_table(result.rows) and resumed.picks == result.picks


@pytest.mark.slow
def test_ray_executor_makes_the_same_decisions(searched_es, tmp_path):
    ray = pytest.importorskip("ray", reason="Ray is the optional 'distributed' extra")
    out, result = searched_es
    try:
        remote = run_search(CXR, tmp_path, overrides=ES, strategies=["truncate"], probe=True, executor="ray",
                            ray_num_cpus=2, **FAST)
    finally:
        ray.shutdown()
    assert remote.trained == result.trained and remote.cost["epochs"] == result.cost["epochs"]
    assert any(status.startswith("stopped at rung") for status, _ in _decisions(result.rows).values())
    assert _decisions(remote.rows) == _decisions(result.rows)
    # rung by rung: the same trials ran to the same epochs, continued from the same checkpoints
    assert _trial_runs(tmp_path) == _trial_runs(out)
    assert _metrics_table(remote.rows) == _metrics_table(result.rows)
    assert remote.picks == result.picks


# ------------------------------------------------------------------------------------------------ bundles, CLI, errors
def _plain_ids(train: dict) -> set[str]:
    set_by_search = {"imports", "bundle_root", "output_dir", "ckpt_path", "strategy", "cut", "fold", "seed",
                     "initialize", "run", "finalize", "checks"}
    return {k for k, v in train.items() if k not in set_by_search and not isinstance(v, dict)
            and not (isinstance(v, str) and v[:1] in "$@" and k != "device")}


@pytest.mark.parametrize("bundle", sorted(p.name for p in (REPO / "bundles").iterdir() if (p / "configs").is_dir()))
def test_search_yaml_forwards_every_train_id(bundle):
    configs = REPO / "bundles" / bundle / "configs"
    search = yaml.safe_load((configs / "search.yaml").read_text())
    train = yaml.safe_load((configs / "train.yaml").read_text())
    assert set(search["search_trial_ids"]) == _plain_ids(train)
    assert all(value == f"@{key}" for key, value in search["search_trial_ids"].items())


@pytest.mark.slow
def test_search_through_the_bundle_cli(tmp_path, one_thread):
    configs = CXR / "configs"
    args = [sys.executable, "-m", "monai.bundle", "run", "--config_file",
            str([str(configs / "train.yaml"), str(configs / "search.yaml")]), "--output_dir", str(tmp_path),
            "--search_strategies", "['truncate','lwft']", "--search_cuts", "['cbr2','cbr3']",
            "--search_stage2", "False", "--search_evaluate_test", "False", "--search_efficiency_runs", "1"]
    for key, value in {**TINY, "backbone": "cbr_tiny"}.items():
        args += [f"--{key}", str(value)]
    done = subprocess.run(args, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "search" / "search_report.json").read_text())
    assert {r["label"] for r in report["rows"]} == {"full", "truncate@cbr2", "truncate@cbr3", "lwft@cbr2",
                                                    "lwft@cbr3"}
    assert {"FTL", "TTL-1", "LWFT-1"} <= set(report["picks"])


def test_bad_input_errors(tmp_path, one_thread):
    with pytest.raises(SearchError, match="does not apply to deit_small.*transfusion"):
        run_search(CXR, tmp_path / "a", overrides={**TINY, "backbone": "deit_small", "in_channels": 1},
                   strategies=["transfusion"], **FAST)
    with pytest.raises(SearchError, match="'linear_probe' is not a cut strategy"):
        run_search(CXR, tmp_path / "b", overrides=TINY, strategies=["linear_probe"], **FAST)
    with pytest.raises(SearchError, match="does not apply to bundle cxr_lung_segmentation"):
        run_search(REPO / "bundles" / "cxr_lung_segmentation", tmp_path / "c",
                   overrides={k: v for k, v in TINY.items() if k != "image_size"}, strategies=["lwft"], **FAST)
    with pytest.raises(SearchError, match="no cut point to search"):
        run_search(CXR, tmp_path / "d", overrides=TINY, cuts=[], **FAST)
    with pytest.raises(SearchError, match=r"n_folds=8:.*fold"):
        run_search(CXR, tmp_path / "e", overrides={**TINY, "n_folds": 8}, **FAST)
    with pytest.raises(SearchError, match="set by the search"):
        run_search(CXR, tmp_path / "f", overrides={**TINY, "cut": "layer2"}, **FAST)
    for name in "abcdf":  # refused before any data was generated or anything trained
        assert not (tmp_path / name / "phantoms").exists() and not (tmp_path / name / "trials").exists(), name


def test_input_too_small_for_the_cost_report_fails_before_any_trial(tmp_path, one_thread):
    """CTPA's default 24 slices are below a 3D MobileNetV2's 32: refused up front, not after every trial trained."""
    small = {"backbone": "mobilenet_v2", "weights": "null", "epochs": 1, "image_size": 48, "device": "cpu",
             "amp": False, "tensorboard": False}
    with pytest.raises(SearchError) as error:
        run_search(REPO / "bundles" / "ctpa_pe_classification", tmp_path, overrides=small, **FAST)
    assert str(error.value) == ("bundle ids num_slices=24, image_size=48: input 1x24x48x48 is too small for "
                                "mobilenet_v2, which needs at least 32x32x32 (spatial) for its cost report; "
                                "nothing was trained")
    assert not (tmp_path / "trials.jsonl").exists() and not (tmp_path / "trials").exists()


def test_search_cli_bad_strategy_exits_2(capsys):
    from medtl3d.cli import main

    assert main(["search", "--bundle", str(CXR), "--strategies", "bogus", "--output", "/tmp/unused"]) == 2
    assert "search strategy 'bogus' is not a cut strategy" in capsys.readouterr().err


def test_failed_trial_names_the_trial_and_its_log(tmp_path, one_thread):
    from medtl3d.search import TrialError

    expected = r"trial full/fold0/seed0 failed: TrainingError: num_workers must be .*fold0_seed0/trial\.log"
    with pytest.raises(TrialError, match=expected):
        run_search(CXR, tmp_path, overrides={**TINY, "num_workers": -1}, cuts=["layer2"], stage2=False, **FAST)
    store = [json.loads(line) for line in (tmp_path / "trials.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in store] == ["header"]  # nothing recorded for the failed trial


def _trial_records(out: Path) -> dict[str, dict]:
    lines = (out / "trials.jsonl").read_text().splitlines()[1:]
    return {r["key"]: r for r in map(json.loads, lines) if r["kind"] == "trial"}


class _Killed(BaseException):
    """A kill right after a checkpoint: not an Exception, so nothing on the way catches it."""


@pytest.mark.slow
def test_interrupted_trial_resumes_from_its_last_checkpoint(tmp_path, monkeypatch):
    """A trial killed after its first epoch's checkpoint is continued from it on the re-run (not retrained) and
    ends with exactly the metrics of an uninterrupted search."""
    import medtl3d.engine.handlers.checkpoint as trainer

    settings = dict(overrides={**TINY, "epochs": 2}, strategies=["truncate"], cuts=["layer1"], stage2=False, **FAST)
    whole = run_search(CXR, tmp_path / "whole", **settings)
    assert not any(r["resumed"] for r in _trial_records(tmp_path / "whole").values())
    save = trainer.save_checkpoint

    def save_then_die(state, path):
        save(state, path)
        if Path(path).name == "last.pt" and state["engine"]["epoch"] == 1:
            raise _Killed

    monkeypatch.setattr(trainer, "save_checkpoint", save_then_die)
    with pytest.raises(_Killed):
        run_search(CXR, tmp_path / "killed", **settings)
    monkeypatch.undo()
    first = tmp_path / "killed" / "trials" / "full" / "fold0_seed0"
    assert (first / "train" / "last.pt").is_file() and not (first / "train" / "train_summary.json").exists()

    resumed = run_search(CXR, tmp_path / "killed", **settings)
    assert resumed.trained == whole.trained and resumed.reused == 0
    records = _trial_records(tmp_path / "killed")
    assert [key for key, r in records.items() if r["resumed"]] == ["full/fold0/seed0"]
    assert "after epoch 1" in (first / "trial.log").read_text()
    assert records["full/fold0/seed0"]["epochs_run"] == 2
    assert _metrics_table(resumed.rows) == _metrics_table(whole.rows)
    assert not (first / "train" / "last.pt").exists()  # engine state dropped once the trial is recorded


@pytest.mark.slow
def test_trials_train_data_parallel_under_torchrun(tmp_path):
    """``processes_per_trial=2``: each trial's bundle model was trained by two ranks (gloo on the CPU); the store
    records the setting, so a single-process re-run of the folder is refused; impossible GPU splits are refused."""
    settings = dict(overrides={k: v for k, v in TINY.items() if k != "device"}, strategies=["truncate"],
                    cuts=["layer1"], stage2=False, **FAST)
    result = run_search(CXR, tmp_path, processes_per_trial=2, **settings)
    assert result.trained == 4 and {r["label"] for r in result.rows} == {"full", "truncate@layer1"}
    assert all(0 <= r["val_auroc_mean"] <= 1 for r in result.rows)
    for trial in (tmp_path / "trials").glob("*/fold*_seed0"):
        model = torch.load(trial / "model.pt", weights_only=True)
        assert model["run_config"]["world_size"] == 2, trial
        assert "device" not in json.loads((trial / "trial_ids.json").read_text())
    with pytest.raises(SearchError, match="processes_per_trial: 2 in the store, None now"):
        run_search(CXR, tmp_path, **settings)
    with pytest.raises(SearchError, match="needs a GPU per process; gpus_per_trial is 1"):
        run_search(CXR, tmp_path / "gpus", processes_per_trial=2, gpus_per_trial=1, **settings)
    with pytest.raises(SearchError, match="processes_per_trial must be an integer >= 1"):
        run_search(CXR, tmp_path / "zero", processes_per_trial=0, **settings)
