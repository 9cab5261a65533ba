"""Studies: the grid (with its random-init controls), each claim's verdict on constructed trial records (clearly
supported, clearly contradicted, inconclusive; t-test intervals checked by hand), the feature-reuse share and its
interval, convergence epochs from a constructed history, the bundles' study.yaml, bad options (one line naming the
option), and one end-to-end study on tiny phantom CXRs (all five claims, a re-run trains nothing, the JSON redraws
the figures)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from medtl3d import cli
from medtl3d.backbones import build_backbone
from medtl3d.errors import Medtl3dError, StudyError
from medtl3d.study import (CONTRADICTED, INCONCLUSIVE, NOT_TESTED, SUPPORTED, claim_budget, claim_convergence,
                           claim_representation, claim_transfer, claim_truncation, epochs_to_fraction, expand_grid,
                           StudyTask, plot_figures, reuse_share, run_study)
from medtl3d.study._claims import annotate_rows

REPO = Path(__file__).resolve().parents[1]
CXR = REPO / "bundles" / "cxr_classification"
N_TRAIN, N_TEST = 40, 10  # correction of the t-test: 1/J + 10/40
RUNS = [(0, 0), (1, 0), (0, 1), (1, 1)]
TINY = {"backbone": "mobilenet_v2", "weights": "mobilenet_v2.imagenet", "epochs": 2, "phantom_cases": 40,
        "phantom_size": 32, "image_size": 32, "batch_size": 8, "amp": False, "tensorboard": False, "device": "cpu"}


@pytest.fixture(scope="module")
def resnet18():
    with torch.device("meta"):
        return build_backbone("resnet18", 2)


def records(scores, history=None):
    """Trial records of one arm: validation AUROC ``scores[i]`` for run ``RUNS[i]``."""
    return [{"fold": f, "seed": s, "val": {"auroc": v}, "history": history[i] if history else []}
            for i, ((f, s), v) in enumerate(zip(RUNS, scores))]


def shifted(base, deltas):
    return [b + d for b, d in zip(base, deltas)]


WT = [0.90, 0.86, 0.88, 0.92]


# ------------------------------------------------------------------------------------------------ grid
def test_grid_adds_a_random_init_control_to_every_truncated_or_slimmed_arm(resnet18):
    arms = expand_grid(resnet18, ["full", "stats", "truncate", "transfusion", "lwft"], ["layer2"],
                       ["pretrained", "random"])
    assert [a.label for a in arms] == ["full", "random", "stats", "truncate@layer2", "RI-truncate@layer2",
                                       "transfusion@layer2", "RI-transfusion@layer2", "lwft@layer2"]
    assert [a.name for a in arms if a.control] == ["RI control of TTL@layer2", "RI control of TF@layer2"]
    assert [a.name for a in arms][:3] == ["WT", "RI", "ST"]
    pretrained_only = expand_grid(resnet18, ["truncate"], "block", ["pretrained"])
    assert [a.label for a in pretrained_only] == ["full"] + [f"truncate@{c}" for c in
                                                             ("stem", "layer1", "layer2", "layer3")]


@pytest.mark.parametrize("args, message", [
    ((["full", "shrink"], "block", ["pretrained"]), "study strategies: 'shrink' is not one of"),
    ((["random"], "block", ["pretrained"]), "RI and the controls come from its weights"),
    ((["truncate"], "block", ["imagenet"]), "study weights: 'imagenet' is not one of pretrained, random"),
    ((["truncate"], "block", ["random"]), "study weights: the grid needs 'pretrained'"),
    ((["truncate"], ["layer9"], ["pretrained"]), "study cuts: "),
])
def test_grid_errors_name_the_option(resnet18, args, message):
    with pytest.raises(StudyError, match=message) as error:
        expand_grid(resnet18, *args)
    assert "\n" not in str(error.value)


def test_ri_and_the_controls_train_without_the_pretrained_weights(tmp_path):
    task = StudyTask(CXR, TINY, tmp_path)
    ids = {arm.label: task.trial_ids(arm, 0, 0, tmp_path / arm.label)
           for arm in expand_grid(task.backbone(), ["full", "truncate"], ["stage3"], ["pretrained", "random"])}
    assert {label: i["weights"] for label, i in ids.items()} == {
        "full": "mobilenet_v2.imagenet", "random": "null", "truncate@stage3": "mobilenet_v2.imagenet",
        "RI-truncate@stage3": "null"}
    assert ids["RI-truncate@stage3"]["cut"] == "stage3" and ids["RI-truncate@stage3"]["strategy"] == "truncate"


# ------------------------------------------------------------------------------------------------ claim 1
def test_transfer_claim_supported_with_the_hand_computed_interval():
    # WT - RI = [0.1, 0.2, 0.3, 0.2]: mean 0.2, s^2 = 0.02/3, se = sqrt((1/4 + 10/40) s^2), t(0.975, 3) = 3.182446
    found = {"full": records(WT), "random": records(shifted(WT, [-0.1, -0.2, -0.3, -0.2]))}
    claim = claim_transfer(found, "auroc", 0.02, N_TRAIN, N_TEST)
    half = 3.182446305284263 * math.sqrt(0.5 * 0.02 / 3)
    main = claim["comparisons"][0]
    assert claim["verdict"] == SUPPORTED and main["comparison"] == "WT - RI" and main["runs"] == 4
    assert main["difference"] == pytest.approx(0.2)
    assert (main["low"], main["high"]) == (pytest.approx(0.2 - half), pytest.approx(0.2 + half))
    # 80% power: (t(0.975, 3) + t(0.8, 3)) * se, t(0.8, 3) = 0.978472
    assert claim["smallest_detectable"] == pytest.approx((3.182446305 + 0.978472) * math.sqrt(0.5 * 0.02 / 3),
                                                         rel=1e-5)


def test_transfer_claim_contradicted_and_inconclusive():
    same = claim_transfer({"full": records(WT), "random": records(shifted(WT, [0.001, -0.001, 0.0005, 0.0]))},
                          "auroc", 0.02, N_TRAIN, N_TEST)
    assert same.get("verdict") == CONTRADICTED  # the gain's interval lies below the margin
    noisy = claim_transfer({"full": records(WT), "random": records(shifted(WT, [-0.2, 0.15, -0.1, 0.05]))},
                           "auroc", 0.02, N_TRAIN, N_TEST)
    assert noisy["verdict"] == INCONCLUSIVE
    untested = claim_transfer({"full": records(WT)}, "auroc", 0.02, N_TRAIN, N_TEST)
    assert untested["verdict"] == NOT_TESTED and untested["statement"].startswith("the grid has no ")
    # every run the same gain: an interval of zero width is no evidence
    constant = claim_transfer({"full": records(WT), "random": records(shifted(WT, [-0.25] * 4))}, "auroc", 0.02,
                              N_TRAIN, N_TEST)
    assert constant["comparisons"][0]["low"] == constant["comparisons"][0]["high"]
    assert constant["verdict"] == INCONCLUSIVE


def test_feature_reuse_share_and_its_interval():
    wt, st, ri = ({run: v for run, v in zip(RUNS, values)} for values in
                  ([0.9, 0.8, 0.85, 0.85], [0.7, 0.6, 0.65, 0.65], [0.5, 0.4, 0.45, 0.45]))
    exact = reuse_share(wt, st, ri)  # (0.85 - 0.65) / (0.85 - 0.45), in every resample
    assert exact["estimate"] == pytest.approx(0.5) and exact["runs"] == 4
    assert exact["low"] == pytest.approx(0.5) and exact["high"] == pytest.approx(0.5)
    st_noisy = {run: v for run, v in zip(RUNS, [0.8, 0.5, 0.7, 0.5])}
    share = reuse_share(wt, st_noisy, ri)
    assert share["estimate"] == pytest.approx((0.85 - 0.625) / 0.4)
    assert share["low"] < share["estimate"] < share["high"]
    per_run = [(wt[k] - st_noisy[k]) / (wt[k] - ri[k]) for k in RUNS]  # a mean of runs stays inside their range
    assert min(per_run) - 1e-9 <= share["low"] and share["high"] <= max(per_run) + 1e-9
    undefined = reuse_share(wt, st, wt)  # WT == RI: no gain to share out
    assert undefined["low"] is None and undefined["method"].startswith("none: undefined on some resamples, where WT")


def test_transfer_claim_reports_st_against_both():
    found = {"full": records(WT), "random": records(shifted(WT, [-0.3, -0.32, -0.29, -0.31])),
             "stats": records(shifted(WT, [-0.299, -0.321, -0.2895, -0.31]))}
    claim = claim_transfer(found, "auroc", 0.02, N_TRAIN, N_TEST)
    verdicts = {c["comparison"]: c["verdict"] for c in claim["comparisons"]}
    assert verdicts == {"WT - RI": SUPPORTED, "WT - ST": SUPPORTED, "ST - RI": CONTRADICTED}
    assert claim["feature_reuse"]["estimate"] == pytest.approx(1.0, abs=0.01)  # all of the gain is reuse


# ------------------------------------------------------------------------------------------------ claims 2, 3
def _row(label, strategy, cut, unit, scores, control=False, ratio=None):
    return {"label": label, "name": label, "strategy": strategy, "cut": cut, "unit": unit, "complete": True, "n": 4,
            "control": control, "val_auroc_mean": float(np.mean(scores)), "macs_g": None if ratio is None else ratio,
            "params_ratio": ratio, "macs_ratio": ratio, "latency_ratio": ratio}


def _truncation_case(deltas_a, deltas_b, deltas_control=(-0.2, -0.25, -0.2, -0.22)):
    """FTL, truncate@a (cheap), truncate@b and the RI control of b."""
    scores = {"full": WT, "truncate@a": shifted(WT, deltas_a), "truncate@b": shifted(WT, deltas_b),
              "RI-truncate@b": shifted(WT, deltas_control)}
    rows = [_row("full", "full", None, None, WT, ratio=1.0), _row("truncate@a", "truncate", "a", 1,
            scores["truncate@a"], ratio=0.25), _row("truncate@b", "truncate", "b", 2, scores["truncate@b"], ratio=0.5),
            _row("RI-truncate@b", "truncate", "b", 2, scores["RI-truncate@b"], control=True, ratio=0.5)]
    found = {label: records(values) for label, values in scores.items()}
    picks = annotate_rows(rows, found, "auroc", 0.02, N_TRAIN, N_TEST)
    return rows, found, picks


def test_truncation_supported_picks_the_cheapest_noninferior_cut_never_a_control():
    rows, found, picks = _truncation_case([-0.1, -0.12, -0.11, -0.1], [0.001, -0.001, 0.0, 0.002])
    claim = claim_truncation(rows, picks, found, "auroc", 0.02, N_TRAIN, N_TEST)
    assert picks == {"truncate": "truncate@b"} and claim["verdict"] == SUPPORTED and claim["pick"] == "truncate@b"
    assert (claim["params_saved"], claim["macs_saved"], claim["latency_saved"]) == (0.5, 0.5, 0.5)
    verdicts = {c["comparison"]: c["verdict"] for c in claim["comparisons"]}
    assert verdicts["truncate@a - WT"] == "inferior" and verdicts["truncate@b - WT"] == "non-inferior"
    assert verdicts["RI-truncate@b - WT"] == "inferior"  # the control is compared, not picked
    assert verdicts["truncate@b - its RI control"] == SUPPORTED


def test_truncation_contradicted_and_inconclusive():
    # every pretrained cut inferior; the control, non-inferior, is never the pick
    rows, found, picks = _truncation_case([-0.1, -0.12, -0.11, -0.1], [-0.2, -0.21, -0.19, -0.2],
                                          [0.001, -0.001, 0.0, 0.002])
    assert picks == {} and claim_truncation(rows, picks, found, "auroc", 0.02, N_TRAIN, N_TEST)["verdict"] == \
        CONTRADICTED
    rows, found, picks = _truncation_case([-0.1, -0.12, -0.11, -0.1], [0.1, -0.15, 0.05, -0.1])
    claim = claim_truncation(rows, picks, found, "auroc", 0.02, N_TRAIN, N_TEST)
    assert claim["verdict"] == INCONCLUSIVE and claim["pick"] is None
    rows, found, picks = _truncation_case([-0.1, -0.12, -0.11, -0.1], [0.0, 0.0, 0.0, 0.0])  # zero-width interval
    claim = claim_truncation(rows, picks, found, "auroc", 0.02, N_TRAIN, N_TEST)
    # the search's own rule (medtl3d.stats.informative): no verdict, so no pick
    assert picks == {} and claim["verdict"] == INCONCLUSIVE and claim["pick"] is None
    assert "truncate@b: the same difference to FTL in every run (an interval of zero width)" in claim["statement"]


def test_budget_claim_needs_both_strategies_noninferior():
    scores = {"full": WT, "transfusion@a": shifted(WT, [0.001, -0.001, 0.0, 0.002]),
              "lwft@a": shifted(WT, [-0.2, -0.21, -0.19, -0.2])}
    rows = [_row("full", "full", None, None, WT, ratio=1.0),
            _row("transfusion@a", "transfusion", "a", 1, scores["transfusion@a"], ratio=0.6),
            _row("lwft@a", "lwft", "a", 1, scores["lwft@a"], ratio=1.0)]
    found = {label: records(values) for label, values in scores.items()}
    picks = annotate_rows(rows, found, "auroc", 0.02, N_TRAIN, N_TEST)
    claim = claim_budget(rows, picks, "auroc", 0.02)
    assert claim["verdicts"] == {"transfusion": SUPPORTED, "lwft": CONTRADICTED}
    assert claim["verdict"] == CONTRADICTED
    assert claim_budget(rows[:1], {}, "auroc", 0.02)["verdict"] == NOT_TESTED


# ------------------------------------------------------------------------------------------------ claims 4, 5
def test_representation_claim_by_depth_and_divergence():
    depths = ["stem", "layer1", "layer2", "layer3"]
    cka = [{"fold": f, "seed": s, "depths": depths, "wt": [0.95, 0.9, 0.8, 0.6 + 0.01 * i],
            "ri": [0.6, 0.4, 0.3, 0.2 + 0.02 * i], "wt_vs_ri": [0.8, 0.6, 0.45, 0.3]}
           for i, (f, s) in enumerate(RUNS)]
    claim = claim_representation(cka, N_TRAIN, N_TEST, threshold=0.5)
    assert claim["verdict"] == SUPPORTED and claim["divergence_depth"] == "layer2"
    assert [row["depth"] for row in claim["by_depth"]] == depths
    assert claim["by_depth"][3]["wt_initial_final"] == pytest.approx(0.615)
    assert claim["comparisons"][0]["method"].startswith("CKA on test cases; corrected resampled t-test")
    flipped = [{**row, "wt": row["ri"], "ri": row["wt"]} for row in cka]
    assert claim_representation(flipped, N_TRAIN, N_TEST, 0.5)["verdict"] == CONTRADICTED
    assert claim_representation(cka, N_TRAIN, N_TEST, 0.2)["divergence_depth"] is None


def test_epochs_to_fraction_of_the_final_score():
    history = [{"epoch": 1, "val_auroc": 0.5}, {"epoch": 2, "val_auroc": 0.8}, {"epoch": 3, "val_auroc": 0.9},
               {"epoch": 4, "val_auroc": 0.88}]
    assert epochs_to_fraction(history, "auroc", 0.95) == 3  # 0.95 * 0.88 = 0.836: first reached at epoch 3
    assert epochs_to_fraction(history, "auroc", 0.9) == 2  # 0.792
    assert epochs_to_fraction(history, "auroc", 1.0) == 3  # the best epoch beats the final one
    assert epochs_to_fraction([{"epoch": 1, "val_auroc": 0.5}, {"epoch": 2, "val_auroc": 1.0}], "auroc", 0.5) == 1
    assert epochs_to_fraction([], "auroc", 0.95) is None


def test_convergence_claim():
    fast = [[{"epoch": 1, "val_auroc": 0.9}, {"epoch": 2, "val_auroc": 0.9}]] * 4
    slow = [[{"epoch": e, "val_auroc": v} for e, v in enumerate([0.5, 0.6, 0.7, 0.9], 1)]] * 4
    slow[0] = [{"epoch": e, "val_auroc": v} for e, v in enumerate([0.5, 0.6, 0.9, 0.9], 1)]
    found = {"full": records(WT, fast), "random": records(WT, slow)}
    claim = claim_convergence(found, "auroc", 0.95, N_TRAIN, N_TEST)
    assert claim["verdict"] == SUPPORTED and claim["epochs"]["WT"]["fold0/seed0"] == 1
    assert claim["epochs"]["RI"] == {"fold0/seed0": 3, "fold1/seed0": 4, "fold0/seed1": 4, "fold1/seed1": 4}
    assert claim["comparisons"][0]["difference"] == pytest.approx(2.75)
    reversed_ = claim_convergence({"full": found["random"], "random": found["full"]}, "auroc", 0.95, N_TRAIN, N_TEST)
    assert reversed_["verdict"] == CONTRADICTED


# ------------------------------------------------------------------------------------------------ bundles, options
def _forwarded_ids(train: dict) -> set[str]:
    set_by_study = {"imports", "bundle_root", "output_dir", "ckpt_path", "strategy", "cut", "fold", "seed",
                    "initialize", "run", "finalize", "checks"}
    return {k for k, v in train.items() if k not in set_by_study and not isinstance(v, dict)
            and not (isinstance(v, str) and v[:1] in "$@" and k != "device")}


@pytest.mark.parametrize("bundle", sorted(p.name for p in (REPO / "bundles").iterdir() if (p / "configs").is_dir()))
def test_study_yaml_forwards_every_train_id(bundle):
    configs = REPO / "bundles" / bundle / "configs"
    study = yaml.safe_load((configs / "study.yaml").read_text())
    train = yaml.safe_load((configs / "train.yaml").read_text())
    assert set(study["study_trial_ids"]) == _forwarded_ids(train)
    assert all(value == f"@{key}" for key, value in study["study_trial_ids"].items())
    assert study["study"]["seeds"] == "@study_seeds" and study["run"] == ["$@study.run()"]


@pytest.mark.parametrize("option, value, message", [
    ("seeds", 0, "seeds=0: give at least one seed"), ("margin", -0.1, "margin=-0.1: must be > 0"),
    ("divergence_cka", 1.5, "divergence_cka=1.5: must be in (0, 1)"),
    ("convergence_fraction", 0.0, "convergence_fraction=0.0: must be in (0, 1]"),
    ("cka_cases", 2, "cka_cases=2: must be >= 4")])
def test_bad_options_name_the_option(tmp_path, option, value, message):
    with pytest.raises(StudyError) as error:
        run_study(CXR, tmp_path, **{option: value})
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


def test_input_too_small_for_the_cost_report_fails_before_any_trial(tmp_path):
    with pytest.raises(Medtl3dError) as error:
        run_study(CXR, tmp_path, overrides={**TINY, "image_size": 16})
    assert str(error.value).startswith("bundle ids image_size=16: input 1x16x16 is too small for mobilenet_v2, "
                                       "which needs at least 32x32 (spatial)")
    assert not (tmp_path / "trials.jsonl").exists() and not (tmp_path / "trials").exists()


def test_cli_bad_input_is_one_line(tmp_path, capsys):
    status = cli.main(["study", "--bundle", str(CXR), "--output", str(tmp_path), "--margin", "-1"])
    assert status == 2
    assert capsys.readouterr().err == "medtl3d study: error: --margin -1.0: must be > 0\n"
    status = cli.main(["study", "--bundle", str(CXR), "--output", str(tmp_path), "--set", "weights=null",
                       "--set", "backbone=resnet18"])
    assert status == 2
    assert capsys.readouterr().err.startswith("medtl3d study: error: --set weights is null: a study compares")


# ------------------------------------------------------------------------------------------------ end to end
OPTIONS = dict(overrides=TINY, n_folds=2, seeds=1, cuts=["stage3"], efficiency_runs=1, efficiency_warmup=0,
               cpus_per_trial=1, cka_cases=16)


@pytest.mark.slow
def test_study_end_to_end_on_phantoms(tmp_path, one_thread):
    result = run_study(CXR, tmp_path, **OPTIONS)
    arms = ["full", "random", "stats", "truncate@stage3", "RI-truncate@stage3", "transfusion@stage3",
            "RI-transfusion@stage3", "lwft@stage3"]
    assert [r["label"] for r in result.rows] == arms and result.trained == len(arms) * 2
    assert [c["claim"] for c in result.claims] == [1, 2, 3, 4, 5]
    assert all(c["verdict"] in (SUPPORTED, CONTRADICTED, INCONCLUSIVE) for c in result.claims)
    on_test = {c["comparison"]: c for c in result.claim(1)["comparisons"] if c["comparison"].endswith("(test cases)")}
    assert set(on_test) == {"WT - RI (test cases)", "WT - ST (test cases)", "ST - RI (test cases)"}
    assert all(c["runs"] == 2 and "corrected resampled t-test" in c["method"] for c in on_test.values())
    assert result.claim(1)["feature_reuse_test_cases"]["runs"] == 2  # an interval, or why there is none
    assert result.limits["runs_per_arm"] == 2 and result.limits["test_cases"] > 0
    for name in ("study_report.md", "study_report.json", "study_report.csv", "study_score_cost.png",
                 "study_cka.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    markdown = (tmp_path / "study_report.md").read_text()
    assert all(f"## Claim {n}:" in markdown for n in range(1, 6)) and "RI control of TTL@stage3" in markdown
    assert "| val auroc |" in markdown and "| test auroc |" in markdown  # the arms table names the key metric
    # the JSON redraws the figures: every point is the mean of its arm's recorded trials
    document = json.loads((tmp_path / "study_report.json").read_text())
    for point in document["figures"]["score_vs_cost"]:
        scores = [t["val"]["auroc"] for t in document["trials"] if t["arm"] == point["label"]]
        assert point["score"] == pytest.approx(sum(scores) / len(scores))
    depths = document["figures"]["cka_by_depth"]
    assert depths and all(0 <= row["wt_initial_final"] <= 1 + 1e-6 for row in depths)
    assert [row["wt_initial_final"] for row in depths] == pytest.approx(
        np.mean([row["wt"] for row in document["cka"]], axis=0).tolist())
    assert all(Path(t["predictions"]).is_file() for t in document["trials"])
    redrawn = plot_figures(document, tmp_path / "redrawn")
    assert all(path.stat().st_size > 0 for path in redrawn.values())
    # a re-run trains nothing and gives the same claims
    again = run_study(CXR, tmp_path, **OPTIONS)
    assert again.trained == 0 and again.reused == len(arms) * 2
    assert [c["verdict"] for c in again.claims] == [c["verdict"] for c in result.claims]
    # killed after all but two trials finished, mid-way through writing a line: only those two train again
    store = tmp_path / "trials.jsonl"
    lines = store.read_text().splitlines(keepends=True)
    finished = [i for i, line in enumerate(lines) if json.loads(line)["kind"] == "trial"]
    store.write_text("".join(lines[: finished[-2]]) + '{"kind": "tri')
    resumed = run_study(CXR, tmp_path, **OPTIONS)
    assert resumed.trained == 2 and resumed.reused == len(arms) * 2 - 2
    assert [r["label"] for r in resumed.rows] == arms


@pytest.mark.slow
def test_study_through_the_bundle_cli(tmp_path, one_thread):
    configs = CXR / "configs"
    args = [sys.executable, "-m", "monai.bundle", "run", "--config_file",
            str([str(configs / "train.yaml"), str(configs / "study.yaml")]), "--output_dir", str(tmp_path),
            "--study_strategies", "['full','truncate']", "--study_cuts", "['stage3']", "--study_seeds", "1",
            "--study_evaluate_test", "False", "--study_efficiency_runs", "1", "--study_cka_cases", "8"]
    for key, value in {**TINY, "epochs": 1, "n_folds": 2}.items():
        args += [f"--{key}", str(value)]
    done = subprocess.run(args, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "study" / "study_report.json").read_text())
    assert [r["label"] for r in report["rows"]] == ["full", "random", "truncate@stage3", "RI-truncate@stage3"]
    assert [c["claim"] for c in report["claims"]] == [1, 2, 3, 4, 5]
    assert report["claims"][2]["verdict"] == NOT_TESTED  # no transfusion / lwft arm in this grid
