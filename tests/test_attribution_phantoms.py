"""The localisation study of ``scripts/bench_attribution.py`` runs on CXR (2D) and CTPA (3D) phantoms read through
the presets and gives finite CAMs of the image's shape; the CTPA ``rv_strain`` option it relies on.

How well the CAMs localise after training is a learned quality that depends on the seed, thread count, BLAS and CPU
(issue 14: 0.187 on one 2-CPU machine where 0.29 was measured on another), so it is measured by the script and quoted
in the README, not asserted here; the CAM's correctness is tested on constructed models in ``test_attribution.py``.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest

from medtl3d.data.phantoms import generate_ctpa

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def bench():
    """scripts/bench_attribution.py as a module."""
    path = Path(__file__).resolve().parents[1] / "scripts" / "bench_attribution.py"
    spec = importlib.util.spec_from_file_location("bench_attribution", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("study", ["cxr", "ctpa"])
def test_localisation_study_runs_on_phantoms(bench, study, tmp_path, monkeypatch):
    """Each study at a smoke scale (20 cases, 1 epoch): every CAM finite and of the image's shape, the measured
    shares in [0, 1], the lesion masks read through the same preset as the images."""
    monkeypatch.setitem(bench.STUDIES, study, {**bench.STUDIES[study], "n": 20, "test": 8,
                                               "training": {**bench.STUDIES[study]["training"], "epochs": 1}})
    row = bench.run_study(study, seed=0, root=tmp_path)
    assert row["gradcam_finite"] and row["gradcampp_finite"] and row["positives"] >= 1
    for key in ("area_share", "gradcam_mass", "gradcam_peak", "gradcampp_mass", "gradcampp_peak"):
        assert 0.0 <= row[key] <= 1.0 and not math.isnan(row[key]), key
    assert 0.0 <= row["auroc"] <= 1.0


def test_ctpa_rv_strain_option_changes_only_the_positives_heart(tmp_path):
    """``rv_strain=False`` (the phantoms of the 3D study) leaves negatives byte-identical and the emboli where
    they were; positives lose the contrast their dilated heart held: the same random numbers are drawn, so each of
    their voxels is at most as bright as with the default (the larger blood pool replaces myocardium)."""
    import nibabel as nib

    volumes = {}
    for rv_strain in (True, False):
        datalist = generate_ctpa(tmp_path / str(rv_strain), 8, shape=(12, 32, 32), spacing=(4.0, 2.0, 2.0), seed=0,
                                 rv_strain=rv_strain)
        items = json.loads(datalist.read_text())["training"]
        volumes[rv_strain] = [(item["label"], *(np.asarray(nib.load(datalist.parent / item[key]).dataobj)
                                                for key in ("image", "lesion"))) for item in items]
    labels = [label for label, _, _ in volumes[True]]
    assert 0 < sum(labels) < len(labels)
    for (label, image, lesion), (label_off, image_off, lesion_off) in zip(volumes[True], volumes[False]):
        assert label == label_off and np.array_equal(lesion, lesion_off)
        if label:
            assert (image >= image_off).all() and (image > image_off).any()
        else:
            assert np.array_equal(image, image_off)
