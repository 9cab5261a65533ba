"""The bundles' ``analysis.yaml`` (analyses as extra run ids) on tiny phantom runs: a classification and the
segmentation bundle are trained (``cbr_tiny`` cut at ``cbr3``, a few CPU seconds) and analysed with every analysis
that applies, and the reports are checked for existence and sane values; the other two bundles' ``analysis.yaml``
are parsed, merged with ``train.yaml`` and run up to their id checks. A wrong analysis name stops the real CLI with
one line naming the ``analyses`` id.
"""

from __future__ import annotations

import json
import math
import subprocess

import pytest
from monai.bundle import ConfigParser, run

from medtl3d.workflows import ConfigIdError
from test_bundles import REPO, _bundle_cli, _cli_args, _configs  # tests/test_bundles.py

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

_TINY = {"backbone": "cbr_tiny", "weights": "null", "cut": "cbr3", "amp": False, "n_folds": 2,
         "tensorboard": False,
         "phantom_size": 64, "image_size": 64, "batch_size": 4}
TINY = {
    "cxr_classification": {**_TINY, "strategy": "truncate", "epochs": 1, "phantom_cases": 20},
    # 24 cases, 30 small steps: a Dice well above zero to re-evaluate, a test split large enough for debiased CKA
    "cxr_lung_segmentation": {**_TINY, "epochs": 6, "lr": 3e-3, "batch_size": 2, "phantom_cases": 24},
}
ANALYSES = {"cxr_classification": ["weights", "reinit", "cka", "probes", "gradcam"],
            "cxr_lung_segmentation": ["weights", "reinit", "cka"]}
UNITS = ["cbr1", "cbr2", "cbr3"]


def _rows(path):
    return json.loads(path.read_text())["rows"]


@pytest.fixture(scope="module", params=list(TINY))
def analysed(request, tmp_path_factory):
    """One bundle trained on phantoms, then its analysis.yaml run with the defaults (two Grad-CAM cases)."""
    name = request.param
    out = tmp_path_factory.mktemp(name)
    common = {"output_dir": str(out), "ckpt_path": str(out / "models" / "model.pt"), **TINY[name]}
    run(config_file=_configs(name, "train.yaml"), **common)
    cams = {} if name == "cxr_lung_segmentation" else {"cam_cases": 2}  # no Grad-CAM for segmentation
    run(config_file=_configs(name, "train.yaml", "analysis.yaml"), **cams, **common)
    return name, out / "analysis"


@pytest.mark.slow
def test_analysis_yaml_writes_every_report(analysed):
    name, out = analysed
    stems = {"weights": "weights", "reinit": "reinit", "cka": "debiased_cka", "probes": "probes"}
    for analysis in ANALYSES[name]:
        if analysis in stems:
            assert all((out / f"{stems[analysis]}{s}").is_file() for s in (".csv", ".json", ".md", ".png")), analysis
    assert (out / "gradcam").is_dir() == ("gradcam" in ANALYSES[name])
    assert (out / "probes.json").is_file() == ("probes" in ANALYSES[name])


@pytest.mark.slow
def test_weights_moved_in_every_trained_layer(analysed):
    _, out = analysed
    rows = _rows(out / "weights.json")
    assert [r["layer"] for r in rows] == [*UNITS, "head"]  # the U-Net's decoder is its "head"
    for row in rows:  # nothing is frozen: every layer moved, and still points roughly where it started
        assert row["l2"] > 0 and row["relative_l2"] > 0 and 0.5 < row["cosine"] <= 1.0, row


@pytest.mark.slow
def test_reinit_rows_per_unit_and_mode(analysed):
    name, out = analysed
    rows = _rows(out / "reinit.json")
    assert [(r["layer"], r["mode"]) for r in rows] == [(u, m) for u in UNITS for m in ("reinit", "rerand")]
    assert json.loads((out / "reinit.json").read_text())["metadata"]["metric"] == (
        "dice" if name == "cxr_lung_segmentation" else "auroc")
    for row in rows:
        assert 0.0 <= row["metric"] <= 1.0 and 0.0 <= row["trained"] <= 1.0, row
        assert row["drop"] == pytest.approx(row["trained"] - row["metric"]), row
    if name == "cxr_lung_segmentation":
        assert rows[0]["trained"] > 0.2  # a Dice to lose


@pytest.mark.slow
def test_cka_initial_vs_final(analysed):
    _, out = analysed
    document = json.loads((out / "debiased_cka.json").read_text())
    assert document["rows"] == document["columns"] == UNITS
    assert document["metadata"]["model_a"] == "initial" and document["metadata"]["policy"] == "pooled"
    values = [v for row in document["matrix"] for v in row]
    assert all(v is not None and math.isfinite(v) and v <= 1.0 + 1e-6 for v in values), document["matrix"]
    assert all(document["matrix"][i][i] > 0.5 for i in range(3))  # a few steps of fine-tuning keep each layer


@pytest.mark.slow
def test_probes_and_gradcam_of_the_classifier(analysed):
    name, out = analysed
    if name != "cxr_classification":
        pytest.skip("probes and Grad-CAM apply to classifiers")
    rows = _rows(out / "probes.json")
    assert {(r["weights"], r["probe"], r["cut"]) for r in rows} == {
        (w, p, c) for w in ("final", "initial") for p in ("knn", "linear") for c in UNITS}
    for row in rows:
        assert 0.0 <= row["accuracy"] <= 1.0 and (row["auroc"] is None or 0.0 <= row["auroc"] <= 1.0), row
    assert any(row["auroc"] is not None for row in rows)
    cams = _rows(out / "gradcam" / "gradcam.json")
    assert len(cams) == 2 and all(0.0 <= r["probability"] <= 1.0 and r["label"] in (0, 1) for r in cams)
    for row in cams:
        png = out / "gradcam" / f"{row['case']}_gradcam.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list((out / "gradcam").glob("*.nii.gz"))  # NIfTI only for 3D models


@pytest.mark.parametrize("name", ["ctpa_pe_classification", "pathology_mitosis_classification"])
def test_other_bundles_analysis_yaml_parses_and_checks_its_ids(name, tmp_path):
    """Without training: the merged config holds every analysis, and its id checks run before any data."""
    parser = ConfigParser()
    parser.read_config(_configs(name, "train.yaml", "analysis.yaml"))
    assert parser["analyses"] == ["weights", "reinit", "cka", "probes", "gradcam"]
    assert "$import medtl3d.analysis.bundle" in parser["imports"] and "$import medtl3d.workflows" in parser["imports"]
    assert parser["analysis"]["_target_"] == "medtl3d.analysis.bundle.BundleAnalyses"
    assert parser["run"] == ["$@analysis.run()"] and (parser["series_key"] == "series") == (
        name == "ctpa_pe_classification")
    common = {"output_dir": str(tmp_path / "out"), "ckpt_path": str(tmp_path / "model.pt")}
    with pytest.raises(ConfigIdError, match="config id 'ckpt_path'"):
        run(config_file=_configs(name, "train.yaml", "analysis.yaml"), **common)
    (tmp_path / "model.pt").touch()  # the id checks only need the file to exist
    with pytest.raises(ConfigIdError, match="config id 'analyses': 'probes' does not apply to task 'multilabel'"):
        run(config_file=_configs(name, "train.yaml", "analysis.yaml"), task="multilabel", **common)
    assert not (tmp_path / "out").exists()  # stopped before generating phantoms


def test_segmentation_refuses_classifier_analyses(tmp_path):
    (tmp_path / "model.pt").touch()
    with pytest.raises(ConfigIdError, match="config id 'analyses': 'gradcam' does not apply to task 'segmentation'"):
        run(config_file=_configs("cxr_lung_segmentation", "train.yaml", "analysis.yaml"),
            ckpt_path=str(tmp_path / "model.pt"), output_dir=str(tmp_path / "out"), analyses=["weights", "gradcam"])


@pytest.mark.slow
def test_wrong_analysis_name_is_one_line_naming_the_id(tmp_path):
    (tmp_path / "model.pt").touch()
    args = _cli_args({"output_dir": str(tmp_path / "out"), "ckpt_path": str(tmp_path / "model.pt"),
                      "analyses": ["weights", "tsne"]})
    configs = "['{}','{}']".format(*_configs("pathology_mitosis_classification", "train.yaml", "analysis.yaml"))
    proc = subprocess.run(_bundle_cli("run", "--config_file", configs, *args), cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = [line for line in proc.stderr.splitlines() if line.strip()][-1]
    assert last.startswith("medtl3d bundle: config id 'analyses': unknown analysis 'tsne'; choose from weights"), last
    assert not (tmp_path / "out").exists()
