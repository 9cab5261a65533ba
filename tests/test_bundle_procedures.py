"""The bundles' procedure configs (search, study, efficiency, analysis, lr_find) as MONAI components: a nested
piece swapped on the command line is the one that runs (a fake stopwatch's fixed readings become the report's
latencies; a recording executor receives the search's trials), a removed piece falls back to the default, and a
wrong value stops while the config is parsed, before any data are made, with one line naming the option."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser, run

from medtl3d.analysis.bundle import BundleAnalyses
from medtl3d.config_ids import ConfigIdError
from medtl3d.engine.lr_finder import LRFinder
from medtl3d.errors import Medtl3dError, medtl3d_cause
from medtl3d.search import LocalExecutor

REPO = Path(__file__).resolve().parents[1]
CXR = REPO / "bundles" / "cxr_classification" / "configs"
TINY = {"backbone": "cbr_tiny", "weights": "null", "phantom_cases": 16, "phantom_size": 64, "image_size": 64,
        "batch_size": 4, "n_folds": 2, "device": "cpu", "amp": False, "tensorboard": False}


def _files(*names: str) -> list[str]:
    return [str(CXR / name) for name in names]


class FakeStopwatch:
    """Every run takes 7 ms: the report's latencies must be exactly that if this stopwatch timed them."""

    def start(self) -> None:
        pass

    def stop(self) -> float:
        return 7.0


class Stopped(Medtl3dError):
    pass


class RecordingExecutor:
    """Keeps the trials it is given and stops the search there (nothing trains)."""

    name = "recording"
    received: list = []

    def map(self, specs, on_result) -> None:
        RecordingExecutor.received = list(specs)
        raise Stopped("stopped by the recording executor")


def _cause(call) -> Medtl3dError:
    """The medtl3d error inside MONAI's wrapper (what the bundle command prints as its one line)."""
    with pytest.raises(Exception) as error:
        call()
    cause = medtl3d_cause(error.value)
    assert cause is not None, error.value
    return cause


def _efficiency(tmp_path, **overrides) -> dict:
    run(config_file=_files("train.yaml", "efficiency.yaml"), output_dir=str(tmp_path), efficiency_cuts="cbr1,cbr2",
        efficiency_runs=3, efficiency_warmup=0, **TINY, **overrides)
    (report,) = (tmp_path / "efficiency").glob("*.json")
    return json.loads(report.read_text())


def test_a_swapped_stopwatch_times_the_report_and_a_removed_one_falls_back_to_the_default(tmp_path):
    fake = _efficiency(tmp_path / "fake", **{"efficiency#stopwatch": {"_target_": f"{__name__}.FakeStopwatch"}})
    assert fake["metadata"]["timer"] == "FakeStopwatch"
    assert [r["cut"] for r in fake["rows"]] == ["cbr4", "cbr1", "cbr2"]  # the full model first
    assert all(r["latency_median_ms"] == 7.0 and r["latency_ratio"] == 1.0 for r in fake["rows"])
    default = _efficiency(tmp_path / "default", **{"efficiency#stopwatch#_disabled_": True})
    assert default["metadata"]["timer"] == "time.perf_counter"
    assert len({r["latency_median_ms"] for r in default["rows"]}) > 1  # measured, not a constant


def test_the_search_runs_its_trials_on_the_executor_component(tmp_path):
    parser = ConfigParser()
    parser.read_config(_files("train.yaml", "search.yaml"))
    assert isinstance(parser.get_parsed_content("search").options["executor"], LocalExecutor)
    cause = _cause(lambda: run(config_file=_files("train.yaml", "search.yaml"), output_dir=str(tmp_path), **TINY,
                               **{"search_strategies": ["truncate"], "search_cuts": ["cbr2", "cbr3"],
                                  "search#executor": {"_target_": f"{__name__}.RecordingExecutor"}}))
    assert isinstance(cause, Stopped)
    # the references train first (straight to the last epoch): FTL on both folds (n_folds 2, one seed)
    assert [(spec.key.split("/")[0], spec.ids["fold"]) for spec in RecordingExecutor.received] == [
        ("full", 0), ("full", 1)]


@pytest.mark.parametrize("config, overrides, message", [
    ("search.yaml", {"search_margin": -1}, "search: margin must be > 0, got -1"),
    ("search.yaml", {"search#noninferior_to": "worst"}, "search: noninferior_to must be best or full, got 'worst'"),
    ("search.yaml", {"search#etaa": 2}, "search: got an unexpected keyword argument 'etaa'"),
    ("search.yaml", {"search_executor": "dask"}, "unknown executor 'dask'; choose one of local, ray"),
    ("study.yaml", {"study_cka_cases": 2}, "study: cka_cases=2: must be >= 4 (CKA needs a few cases)"),
    ("study.yaml", {"study_weights": ["random"]}, "study: study weights: the grid needs 'pretrained'"),
    ("efficiency.yaml", {"efficiency_batch_sizes": [0]}, "efficiency: batch sizes must be >= 1, got [0]"),
    ("efficiency.yaml", {"efficiency#dtype": "float8"}, "efficiency: unknown dtype 'float8'"),
    ("efficiency.yaml", {"efficiency_runs": -1}, "efficiency: runs must be an integer >= 0, got -1"),
])
def test_a_wrong_value_stops_when_the_component_is_built_naming_the_option(tmp_path, config, overrides, message):
    cause = _cause(lambda: run(config_file=_files("train.yaml", config), output_dir=str(tmp_path), **TINY,
                               **overrides))
    assert str(cause).startswith(message), cause
    assert not (tmp_path / "phantoms").exists()  # before any data were made


def test_the_analysis_component_names_the_id_of_a_wrong_option(tmp_path):
    common = dict(ckpt_path=str(tmp_path / "model.pt"), data=[], task="binary", output_dir=str(tmp_path))
    cases = [({"analyses": ["cka"], "cka_policy": "mean"}, "config id 'cka_policy': unknown policy 'mean'"),
             ({"analyses": ["gradcam"], "cam_method": "lime"}, "config id 'cam_method': unknown attribution "),
             ({"analyses": ["reinit"], "reinit_modes": ["zero"]}, "config id 'reinit_modes': give one or more of "),
             ({"analyses": ["gradcam"], "cam_cases": 0}, "config id 'cam_cases': must be an integer >= 1, got 0"),
             ({"analyses": ["weights"], "batch_size": 0}, "config id 'batch_size': must be an integer >= 1"),
             ({"analyses": ["probes"]}, "config id 'analyses': 'probes' needs the training split")]
    for options, message in cases:
        with pytest.raises(ConfigIdError) as error:
            BundleAnalyses(**common, **options)
        assert str(error.value).startswith(f"medtl3d bundle: {message}"), error.value
    # what does not run is not checked: segmentation's analysis.yaml sets cam_cases 0 and no probe data
    assert BundleAnalyses(**common, analyses=["weights", "cka"], cam_cases=0, cam_method=None).analyses == [
        "weights", "cka"]


def test_the_lr_finder_component_checks_its_options_when_built():
    model = torch.nn.Linear(2, 1)
    for options, message in [({"num_iter": 2}, "lr_find: num_iter must be an integer >= 3, got 2"),
                             ({"start_lr": 1.0, "end_lr": 0.1}, "lr_find: start_lr must be > 0 and below end_lr"),
                             ({"optimizer": "lamb"}, "lr_find: optimizer='lamb' is not supported"),
                             ({"num_iters": 5}, "lr_find: got an unexpected keyword argument 'num_iters'")]:
        with pytest.raises(Medtl3dError) as error:
            LRFinder(model, [], task="binary", output_dir="unused", **options)
        assert str(error.value).startswith(message), error.value


@pytest.mark.slow  # a bundle process: ~40 s on the shared 2-core machine
def test_a_wrong_search_option_is_one_line_on_the_bundle_command(tmp_path):
    args = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(_files("train.yaml", "search.yaml")),
            "--output_dir", str(tmp_path), "--search_margin", "-0.5"]
    for key, value in TINY.items():
        args += [f"--{key}", str(value)]
    done = subprocess.run(args, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr[-3000:]
    last = [line for line in done.stderr.splitlines() if line.strip()][-1]
    assert last == "medtl3d bundle: search: margin must be > 0, got -0.5", last
    assert not (tmp_path / "phantoms").exists()
