"""A bundle's ``inference.yaml`` in MONAI model-zoo form: the SupervisedEvaluator it builds predicts what
:func:`~medtl3d.inference.infer_folder` predicts, records a corrupt file and goes on (exit status 1), resumes an
interrupted run with only its missing cases, and its handlers can be removed or changed on the command line."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser, run
from PIL import Image

import medtl3d.inference._dataset as dataset_module  # where cases are loaded
from medtl3d.engine._checkpoint import save_checkpoint
from medtl3d.errors import CasesFailedError, medtl3d_cause
from medtl3d.inference import JOURNAL_DIR, infer_folder
from medtl3d.strategies import create_model
from medtl3d.workflows import ConfigIdError

INFERENCE = Path(__file__).resolve().parents[1] / "bundles" / "cxr_classification" / "configs" / "inference.yaml"
CONFIG = {"backbone": "cbr_tiny", "strategy": "random", "num_classes": 1, "spatial_dims": 2, "in_channels": 1}
SETTINGS = {"task": "binary", "preset": "cxr", "preset_options": {"size": 16}}
LOAD_IMAGE = dataset_module.load_image


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A trained-bundle checkpoint: weights, how to rebuild them and the preprocessing inference repeats."""
    torch.manual_seed(0)
    model = create_model(**CONFIG)
    path = tmp_path_factory.mktemp("models") / "model.pt"
    save_checkpoint({"model": model.state_dict(), "initial_state": model.initial_state, "model_config": CONFIG,
                     "inference": SETTINGS}, path)
    return path


@pytest.fixture
def films(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for k in range(5):
        Image.fromarray(rng.integers(0, 256, (20, 18), dtype=np.uint8)).save(folder / f"film{k}.png")
    return folder


def _rows(path: Path) -> dict[str, dict]:
    with open(path, newline="") as f:
        return {row["case_id"] or Path(row["path"]).name: row for row in csv.DictReader(f)}


def _run(checkpoint, folder, out, **overrides):
    run(config_file=str(INFERENCE), ckpt_path=str(checkpoint), input_dir=str(folder), output_dir=str(out),
        device="cpu", **overrides)


def test_a_corrupt_file_is_recorded_and_the_rest_predicted_as_infer_folder_does(checkpoint, films, tmp_path):
    reference = infer_folder(checkpoint, "cxr", films, tmp_path / "python", preset_options={"size": 16},
                             progress=False)
    assert reference.n_ok == 5
    (films / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(200)))
    with pytest.raises(Exception) as failed:  # MONAI wraps what a config expression raises
        _run(checkpoint, films, tmp_path / "bundle")
    assert isinstance(medtl3d_cause(failed.value), CasesFailedError)
    assert re.search(r"1 case\(s\) failed or were skipped; reasons in .*predictions.csv", str(medtl3d_cause(failed.value)))
    rows, expected = _rows(tmp_path / "bundle" / "predictions.csv"), _rows(reference.csv_path)
    assert rows.pop("corrupt")["status"] == "failed" and set(rows) == set(expected)
    assert {k: (r["status"], r["probability"]) for k, r in rows.items()} == \
        {k: ("ok", r["probability"]) for k, r in expected.items()}
    assert not (tmp_path / "bundle" / JOURNAL_DIR).exists()
    with pytest.raises(ConfigIdError, match="config id 'input_dir': directory .*missing does not exist"):
        _run(checkpoint, tmp_path / "missing", tmp_path / "bundle2")


def _interrupting(monkeypatch, after: int | None, loads: list[str]) -> None:
    def load(case, **kwargs):
        if after is not None and len(loads) == after:
            raise KeyboardInterrupt
        loads.append(case.case_id)
        return LOAD_IMAGE(case, **kwargs)

    monkeypatch.setattr(dataset_module, "load_image", load)


def test_an_interrupted_bundle_run_resumes_with_only_the_missing_cases(checkpoint, films, tmp_path, monkeypatch):
    out, loads = tmp_path / "out", []
    _interrupting(monkeypatch, 3, loads)
    with pytest.raises(KeyboardInterrupt):
        _run(checkpoint, films, out, batch_size=1)
    assert not (out / "predictions.csv").exists() and (out / JOURNAL_DIR).is_dir()
    loads.clear()
    _interrupting(monkeypatch, None, loads)
    _run(checkpoint, films, out, batch_size=1)
    assert loads == ["film3", "film4"]
    assert {r["status"] for r in _rows(out / "predictions.csv").values()} == {"ok"}


def test_handlers_are_removed_and_changed_on_the_command_line(checkpoint, films, tmp_path, monkeypatch):
    handlers = ConfigParser.load_config_file(str(INFERENCE))["handlers"]
    assert [h["_target_"].rsplit(".", 1)[1] for h in handlers] == ["OutputLock", "PredictionWriter", "Journal",
                                                                   "CaseProgress"]
    # without the journal an interrupted run leaves nothing behind, and the next one reads every case again
    out, loads = tmp_path / "no_journal", []
    _interrupting(monkeypatch, 3, loads)
    with pytest.raises(KeyboardInterrupt):
        _run(checkpoint, films, out, batch_size=1, **{"handlers#2#_disabled_": True})
    assert not (out / JOURNAL_DIR).exists()
    loads.clear()
    _interrupting(monkeypatch, None, loads)
    _run(checkpoint, films, out, batch_size=1, **{"handlers#2#_disabled_": True})
    assert loads == [f"film{k}" for k in range(5)]
    # the writer with other columns; without it nothing is published and no exit status is set
    _run(checkpoint, films, tmp_path / "narrow", **{"handlers#1#columns": ["case_id", "status", "probability"]})
    with open(tmp_path / "narrow" / "predictions.csv", newline="") as f:
        assert next(csv.reader(f)) == ["case_id", "status", "probability"]
    (films / "corrupt.png").write_bytes(b"not a png")
    _run(checkpoint, films, tmp_path / "silent", **{"handlers#1#_disabled_": True})  # no CasesFailedError either
    assert not (tmp_path / "silent" / "predictions.csv").exists()
