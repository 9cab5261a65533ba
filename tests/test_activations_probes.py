"""Activation capture (2D/3D backbones, TransferModels, plain modules), flattening policies, and the layer-wise
kNN / linear probes (hand-checked kNN vote, separable toy sets, per-cut reports)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from medtl3d.analysis._registry import get_analysis
from medtl3d.analysis.activations import (
    collect_activations,
    flatten_activations,
    iter_activations,
    iter_paired_activations,
    resolve_cuts,
)
from medtl3d.analysis.probes import knn_predict, knn_probe, linear_probe, probe_cut_points
from medtl3d.backbones import create_backbone
from medtl3d.errors import AnalysisError


@pytest.fixture(scope="module")
def resnet3d():
    torch.manual_seed(0)
    return create_backbone("resnet18", spatial_dims=3, in_channels=1)


# ---------------------------------------------------------------------------------------------------- flattening
def test_flattening_policies():
    a = torch.arange(2 * 3 * 2 * 2, dtype=torch.float64).reshape(2, 3, 2, 2)
    pooled = flatten_activations(a, "pooled")
    assert pooled.shape == (2, 3) and pooled[1, 2].item() == (20 + 21 + 22 + 23) / 4
    spatial = flatten_activations(a, "spatial")
    assert spatial.shape == (8, 3)
    assert spatial[5].tolist() == a[1, :, 0, 1].tolist()  # image 1, position (0, 1): its 3 channels
    assert flatten_activations(a, "flatten").shape == (2, 12)
    assert flatten_activations(a, "flatten", spatial_size=1).tolist() == pooled.tolist()
    five = torch.randn(4, 6, 3, 4, 4)
    assert flatten_activations(five, "spatial", spatial_size=(1, 2, 2), channels=2).shape == (16, 2)
    # the channel subset is the same for every batch (drawn from the seed and the width)
    first = flatten_activations(five[:2], "pooled", channels=3, seed=7)
    second = flatten_activations(five, "pooled", channels=3, seed=7)[:2]
    assert torch.equal(first, second)
    two_d = torch.randn(5, 7)
    assert flatten_activations(two_d, "spatial") is two_d
    with pytest.raises(AnalysisError, match="channels=9"):
        flatten_activations(five, "pooled", channels=9)
    with pytest.raises(AnalysisError, match="not to 'pooled'"):
        flatten_activations(five, "pooled", spatial_size=2)


# ---------------------------------------------------------------------------------------------------- capture
def test_capture_two_cuts_of_a_3d_backbone(resnet3d):
    x = torch.randn(5, 1, 16, 16, 16, generator=torch.Generator().manual_seed(1))
    resnet3d.eval()  # capture runs in eval mode (batch norm on running statistics)
    with torch.no_grad():
        expected = resnet3d.forward_cuts(x, ["layer1", "layer2"])
    resnet3d.train()
    batches = []
    for acts in iter_activations(resnet3d, x, ["layer1", "layer2"], policy="spatial", batch_size=2):
        assert torch.is_grad_enabled() and not resnet3d.training  # no_grad only inside; eval while streaming
        batches.append(acts)
    assert len(batches) == 3 and [b["layer1"].shape[0] for b in batches] == [2 * 64, 2 * 64, 64]  # 4x4x4 positions
    spatial = collect_activations(resnet3d, x, ["layer1", "layer2"], policy="spatial", batch_size=2)
    assert spatial["layer1"].shape == (5 * 64, 64) and spatial["layer2"].shape == (5 * 8, 128)
    assert torch.allclose(spatial["layer2"], expected["layer2"].flatten(2).transpose(1, 2).reshape(-1, 128),
                          atol=1e-5)
    pooled = collect_activations(resnet3d, x, ["layer1", "layer2"], batch_size=2)
    assert torch.allclose(pooled["layer1"], expected["layer1"].mean(dim=(2, 3, 4)), atol=1e-5)
    assert resnet3d.training  # restored after capture


def test_capture_from_transfer_model_and_plain_module():
    from medtl3d.strategies import create_model

    model = create_model("cbr_tiny", "full", num_classes=2, spatial_dims=2, in_channels=1)
    x = torch.randn(6, 1, 32, 32)
    dataset = TensorDataset(x, torch.arange(6) % 2)
    acts, labels = collect_activations(model, dataset, "block", batch_size=4, return_labels=True)
    assert list(acts) == ["cbr1", "cbr2", "cbr3", "cbr4"] and acts["cbr4"].shape == (6, 512)
    assert labels.tolist() == [0, 1, 0, 1, 0, 1]
    plain = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten())
    acts = collect_activations(plain, DataLoader(dataset, batch_size=4), ["0", "2"], policy="flatten")
    assert acts["0"].shape == (6, 3 * 30 * 30) and torch.equal(acts["2"], torch.relu(acts["0"]))
    with pytest.raises(AnalysisError, match="no submodule 'fc'.*valid names: 0, 1, 2"):
        collect_activations(plain, x, ["fc"])


def test_paired_capture_and_unknown_cut(resnet3d):
    other = create_backbone("resnet18", spatial_dims=3, in_channels=1)
    x = torch.randn(4, 1, 16, 16, 16)
    pairs = list(iter_paired_activations(resnet3d, other, x, ["layer1"], ["layer2", "layer3"], batch_size=2))
    assert len(pairs) == 2
    assert list(pairs[0][0]) == ["layer1"] and list(pairs[0][1]) == ["layer2", "layer3"]
    assert pairs[0][1]["layer3"].shape == (2, 256)
    with pytest.raises(AnalysisError, match="no cut point 'layer9'.*valid cut points: stem, layer1.0"):
        resolve_cuts(resnet3d, ["layer1", "layer9"])
    with pytest.raises(AnalysisError, match="no batches"):
        collect_activations(resnet3d, [], ["layer1"])


# ---------------------------------------------------------------------------------------------------- kNN
def test_knn_vote_by_hand():
    train_x = [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]  # cosine similarity to (1, 0): 1, 0, 1/sqrt(2)
    train_y = [0, 1, 1]
    # k=2, T=1: neighbours 0 and 2 vote e^1 for class 0 and e^(1/sqrt 2) for class 1
    e1, e2 = math.e, math.exp(1 / math.sqrt(2))
    probabilities = knn_predict(train_x, train_y, [[2.0, 0.0]], k=2, temperature=1.0)
    assert probabilities[0].tolist() == pytest.approx([e1 / (e1 + e2), e2 / (e1 + e2)], abs=1e-12)
    # k=3 adds e^0 = 1 to class 1, which then wins: 0.4731 vs 0.5269
    probabilities = knn_predict(train_x, train_y, [[2.0, 0.0]], k=3, temperature=1.0)
    assert probabilities[0].tolist() == pytest.approx([e1 / (e1 + e2 + 1), (e2 + 1) / (e1 + e2 + 1)], abs=1e-12)
    result = knn_probe(train_x, train_y, [[2.0, 0.0], [0.1, 1.0]], [0, 1], k=2, temperature=1.0)
    assert result["accuracy"] == 1.0 and result["auroc"] == 1.0
    assert knn_probe(train_x, train_y, [[2.0, 0.0], [0.1, 1.0]], [0, 1], temperature=1.0)["k"] == 3  # clipped


def _blobs(n: int, classes: int, dims: int, seed: int, spread: float = 0.3):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dims, generator=g) * 3
    y = torch.arange(n) % classes
    return centres[y] + spread * torch.randn(n, dims, generator=g), y


@pytest.mark.parametrize("probe", ["knn", "linear"])
@pytest.mark.parametrize("classes", [2, 4])
def test_probes_on_separable_toy_sets(probe, classes):
    """Measured for data seeds classes + 0/10/20 (1 thread; +0 also with 2): accuracy and AUROC 1.00 in every run."""
    x, y = _blobs(240, classes, 16, seed=classes)
    result = get_analysis("probe", probe)(x[:160], y[:160], x[160:], y[160:])
    assert result["accuracy"] >= 0.99 and result["auroc"] >= 0.99
    assert result["n_train"] == 160 and result["n_test"] == 80


def test_linear_probe_learns_what_knn_cannot_see():
    """The label is the sign of one feature among 20 noisy ones: a linear probe finds it, a cosine kNN struggles.
    Measured for data seeds 3, 13, 23 (1 thread; seed 3 also with 2, identical): linear accuracy 0.91-0.97, kNN
    0.78-0.85, linear training loss 0.023-0.030. The accuracy bound was 0.9, 0.01 below the worst, so it is 0.8 now
    (0.11 below; chance is 0.5); linear > kNN by 0.08-0.13."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(400, 20, generator=g)
    y = (x[:, 0] > 0).long()
    linear = linear_probe(x[:300], y[:300], x[300:], y[300:])
    knn = knn_probe(x[:300], y[:300], x[300:], y[300:])
    assert linear["accuracy"] >= 0.8 and linear["accuracy"] > knn["accuracy"]
    assert linear["train_loss"] < 0.3


def test_probe_errors():
    with pytest.raises(AnalysisError, match="3 labels for 4"):
        knn_probe(torch.randn(4, 2), [0, 1, 0], torch.randn(2, 2), [0, 1])
    with pytest.raises(AnalysisError, match="train_x has 2 features but test_x has 3"):
        linear_probe(torch.randn(4, 2), [0, 1, 0, 1], torch.randn(2, 3), [0, 1])
    with pytest.raises(AnalysisError, match="NaN"):
        knn_probe(torch.tensor([[0.0, float("nan")]]), [0], torch.randn(1, 2), [0])
    assert math.isnan(knn_probe(torch.randn(4, 2), [0, 1, 0, 1], torch.randn(2, 2), [1, 1])["auroc"])


# ---------------------------------------------------------------------------------------------------- per cut
def test_probe_cut_points_writes_reports(tmp_path):
    torch.manual_seed(4)
    backbone = create_backbone("cbr_tiny", spatial_dims=2, in_channels=1)
    x, y = _blobs(48, 2, 16 * 16, seed=5, spread=0.5)
    images = x.reshape(48, 1, 16, 16)
    train = DataLoader(TensorDataset(images[:32], y[:32]), batch_size=8)
    test = [{"image": images[32:], "label": y[32:]}]  # dict batches, MONAI style
    rows = probe_cut_points(backbone, train, test, ["cbr1", "cbr3"], options={"knn": {"k": 5}},
                            output_dir=tmp_path)
    assert [(r["cut"], r["probe"]) for r in rows] == [("cbr1", "knn"), ("cbr1", "linear"), ("cbr3", "knn"),
                                                      ("cbr3", "linear")]
    assert rows[0]["k"] == 5 and rows[0]["features"] == 64 and rows[2]["features"] == 256
    # blobs in pixel space stay separable after one random conv block: 1.00 measured for seeds 4/5 + 0, 10, 20
    assert rows[1]["accuracy"] >= 0.9
    document = json.loads((tmp_path / "probes.json").read_text())
    assert len(document["rows"]) == 4 and document["metadata"]["policy"] == "pooled"
    assert (tmp_path / "probes.png").stat().st_size > 0 and (tmp_path / "probes.csv").exists()
    with pytest.raises(AnalysisError, match="options given for probes that are not run: svm"):
        probe_cut_points(backbone, train, test, ["cbr1"], options={"svm": {}})
