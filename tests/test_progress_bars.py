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
