"""Progress bars only on a terminal: MONAI's "Loading dataset" bar of the bundles' cached datasets and the
activation bars of the analyses and the search's probes stay out of log files."""

from __future__ import annotations

import io
import sys

import numpy as np
import pytest
import torch
from monai.transforms import Compose
from PIL import Image

from medtl3d import workflows
from medtl3d.analysis.activations import collect_activations


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("stream, shown", [(io.StringIO, False), (_Terminal, True)])
def test_loading_dataset_bar_only_on_a_terminal(tmp_path, monkeypatch, stream, shown):
    path = tmp_path / "case.png"
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(path)
    err = stream()
    monkeypatch.setattr(sys, "stderr", err)
    dataset = workflows.image_dataset([{"image": str(path), "label": 0}], Compose([]), task="binary")
    assert dataset.progress is shown and len(dataset) == 1
    assert ("Loading dataset" in err.getvalue()) is shown


@pytest.mark.parametrize("stream, shown", [(io.StringIO, False), (_Terminal, True)])
def test_activation_bar_only_on_a_terminal(monkeypatch, stream, shown):
    err = stream()
    monkeypatch.setattr(sys, "stderr", err)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.ReLU())
    data = [{"image": torch.zeros(1, 8, 8), "label": 0}] * 2
    acts = collect_activations(model, data, ["0"], batch_size=1, progress=True)
    assert set(acts) == {"0"}
    assert ("activations" in err.getvalue()) is shown


@pytest.mark.parametrize("progress", [False, True])
def test_window_dataset_caching_bar_follows_progress(tmp_path, monkeypatch, progress):
    import json

    from medtl3d.data.phantoms import generate_ctpa
    from medtl3d.data.presets import preset
    from medtl3d.data.windows import WindowDataset

    datalist = generate_ctpa(tmp_path, 1, shape=(8, 16, 16), seed=1)
    items = [{**item, "image": str(tmp_path / item["image"])} for item in json.loads(datalist.read_text())["training"]]
    err = _Terminal()
    monkeypatch.setattr(sys, "stderr", err)
    dataset = WindowDataset(items, preset("ct", train=False, size=16), num_slices=8, progress=progress)
    assert len(dataset) == 1 and ("Loading dataset" in err.getvalue()) is progress


def test_ctpa_bundle_datasets_show_the_caching_bar_on_a_terminal_only():
    from pathlib import Path

    from monai.bundle import ConfigParser

    configs = Path(__file__).resolve().parents[1] / "bundles" / "ctpa_pe_classification" / "configs"
    parser = ConfigParser()
    parser.read_config([str(configs / name) for name in ("train.yaml", "evaluate.yaml", "analysis.yaml")])
    names = [k for k, v in parser.get().items() if isinstance(v, dict) and str(v.get("_target_", "")).endswith(
        "WindowDataset")]
    assert sorted(names) == ["analysis_dataset", "eval_dataset", "probe_dataset", "train_dataset", "val_dataset"]
    assert all(parser[f"{name}#progress"] == "$medtl3d.engine.runtime.on_terminal()" for name in names)
