"""Layer-wise probes on frozen features: weighted kNN and linear (logistic-regression) probes per cut point.

- **kNN** (the kNN monitor of Wu et al. 2018 as used by DINO and by Matsoukas et al. 2022): features are
  L2-normalised, a test point's ``k`` most cosine-similar training points vote for their class with weight
  ``exp(sim / T)``, and the normalised votes are the class probabilities. Defaults ``k=200``, ``T=0.1``; ``k`` is
  clipped to the training-set size.
- **Linear**: multinomial logistic regression (L2-penalised, full-batch L-BFGS in float64) on features
  standardised with the training set's mean and std.

Both return accuracy and AUROC (binary, or macro one-vs-rest for more classes; NaN when the test labels hold a
single class). :func:`probe_cut_points` extracts the features of every cut point in one pass per data set and
probes each, writing CSV/JSON/Markdown and a per-cut PNG curve when given an output directory. The probes are a
few lines of torch each; sklearn is not a dependency of medtl3d, and torch keeps them on the features' device.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import AnalysisError
from ._registry import get_analysis, register_analysis
from ..reporting import write_curves
from .activations import _backbone_of, collect_activations, flatten_activations, resolve_cuts


# ---------------------------------------------------------------------------------------------------- inputs
def _features(x, name: str) -> torch.Tensor:
    x = torch.as_tensor(x)
    x = flatten_activations(x if x.is_floating_point() else x.double(), "pooled").to(torch.float64)
    if not bool(torch.isfinite(x).all()):
        raise AnalysisError(f"{name} contains NaN or inf values")
    return x


def _labels(y, rows: int, name: str) -> torch.Tensor:
    y = torch.as_tensor(y).reshape(-1)
    if y.is_floating_point():
        if not bool((y == y.round()).all()):
            raise AnalysisError(f"{name} must be integer class labels, got non-integer values")
        y = y.round()
    y = y.long()
    if y.numel() != rows:
        raise AnalysisError(f"{name} has {y.numel()} labels for {rows} feature rows")
    if y.numel() and int(y.min()) < 0:
        raise AnalysisError(f"{name} holds negative class labels ({int(y.min())})")
    return y


def _inputs(train_x, train_y, test_x, test_y, num_classes: int | None):
    """Validated float64 features, long labels (``test_y`` may be None) and the class count (at least 2)."""
    train_x, test_x = _features(train_x, "train_x"), _features(test_x, "test_x")
    if train_x.shape[1] != test_x.shape[1]:
        raise AnalysisError(f"train_x has {train_x.shape[1]} features but test_x has {test_x.shape[1]}")
    if train_x.shape[0] < 1 or test_x.shape[0] < 1:
        raise AnalysisError(f"probes need training and test points, got {train_x.shape[0]} and {test_x.shape[0]}")
    train_y = _labels(train_y, train_x.shape[0], "train_y").to(train_x.device)
    classes = int(train_y.max()) + 1
    if test_y is not None:
        test_y = _labels(test_y, test_x.shape[0], "test_y").to(train_x.device)
        classes = max(classes, int(test_y.max()) + 1)
    if num_classes is not None:
        if num_classes < classes:
            raise AnalysisError(f"num_classes={num_classes} but the labels go up to {classes - 1}")
        classes = num_classes
    return train_x, train_y, test_x.to(train_x.device), test_y, max(classes, 2)


def _metrics(probabilities: torch.Tensor, y: torch.Tensor) -> dict:
    """Accuracy and AUROC (binary: class 1's probability; else macro one-vs-rest) of class probabilities."""
    from torchmetrics.functional.classification import binary_auroc, multiclass_auroc

    accuracy = float((probabilities.argmax(1) == y).double().mean())
    if y.unique().numel() < 2:
        auroc = math.nan
    elif probabilities.shape[1] == 2:
        auroc = float(binary_auroc(probabilities[:, 1].float(), y))
    else:
        auroc = float(multiclass_auroc(probabilities.float(), y, num_classes=probabilities.shape[1],
                                       average="macro"))
    return {"accuracy": accuracy, "auroc": auroc}


# ---------------------------------------------------------------------------------------------------- kNN
def knn_predict(train_x, train_y, test_x, *, k: int = 200, temperature: float = 0.1, num_classes: int | None = None,
                chunk_size: int = 1024) -> torch.Tensor:
    """Class probabilities ``(N_test, C)`` of the cosine kNN vote with weights ``exp(sim / temperature)``."""
    if k < 1:
        raise AnalysisError(f"k must be >= 1, got {k}")
    if temperature <= 0:
        raise AnalysisError(f"temperature must be > 0, got {temperature}")
    train_x, train_y, test_x, _, classes = _inputs(train_x, train_y, test_x, None, num_classes)
    bank, queries = F.normalize(train_x, dim=1), F.normalize(test_x, dim=1)
    k = min(k, bank.shape[0])
    probabilities = []
    for chunk in queries.split(chunk_size):
        similarity, index = (chunk @ bank.T).topk(k, dim=1)
        votes = torch.zeros(chunk.shape[0], classes, dtype=bank.dtype, device=bank.device)
        votes.scatter_add_(1, train_y[index], torch.exp(similarity / temperature))
        probabilities.append(votes / votes.sum(1, keepdim=True))
    return torch.cat(probabilities)


@register_analysis("probe", "knn")
def knn_probe(train_x, train_y, test_x, test_y, *, k: int = 200, temperature: float = 0.1,
              num_classes: int | None = None, chunk_size: int = 1024) -> dict:
    """Weighted cosine kNN probe: accuracy and AUROC on the test set (``k`` clipped to the training size)."""
    train_x, train_y, test_x, test_y, classes = _inputs(train_x, train_y, test_x, test_y, num_classes)
    probabilities = knn_predict(train_x, train_y, test_x, k=k, temperature=temperature, num_classes=classes,
                                chunk_size=chunk_size)
    result = _metrics(probabilities, test_y)
    result.update(n_train=int(train_x.shape[0]), n_test=int(test_x.shape[0]), k=min(k, int(train_x.shape[0])),
                  temperature=temperature)
    return result


# ---------------------------------------------------------------------------------------------------- linear
@register_analysis("probe", "linear")
def linear_probe(train_x, train_y, test_x, test_y, *, l2: float = 1e-4, max_iter: int = 200,
                 num_classes: int | None = None) -> dict:
    """Multinomial logistic regression on standardised frozen features (loss ``CE + l2/2 |W|^2``, L-BFGS)."""
    if l2 < 0:
        raise AnalysisError(f"l2 must be >= 0, got {l2}")
    train_x, train_y, test_x, test_y, classes = _inputs(train_x, train_y, test_x, test_y, num_classes)
    mean, std = train_x.mean(0), train_x.std(0, correction=0)
    std = torch.where(std > 1e-12, std, torch.ones_like(std))
    train_s, test_s = (train_x - mean) / std, (test_x - mean) / std
    layer = nn.Linear(train_s.shape[1], classes, dtype=torch.float64, device=train_s.device)
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    optimizer = torch.optim.LBFGS(layer.parameters(), lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe",
                                  tolerance_grad=1e-10, tolerance_change=1e-12, history_size=20)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(layer(train_s), train_y) + 0.5 * l2 * layer.weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    with torch.no_grad():
        loss = F.cross_entropy(layer(train_s), train_y) + 0.5 * l2 * layer.weight.square().sum()
        probabilities = torch.softmax(layer(test_s), dim=1)
    result = _metrics(probabilities, test_y)
    result.update(n_train=int(train_x.shape[0]), n_test=int(test_x.shape[0]), train_loss=float(loss))
    return result


# ---------------------------------------------------------------------------------------------------- per cut
def probe_cut_points(backbone: nn.Module, train_data, test_data, cuts: str | Sequence[str] = "block",
                     probes: Sequence[str] = ("knn", "linear"), policy: str = "pooled", *, spatial_size=None,
                     channels: int | None = None, seed: int = 0, batch_size: int = 32, device=None,
                     options: Mapping[str, Mapping] | None = None, output_dir: str | Path | None = None,
                     progress: bool = False) -> list[dict]:
    """Probe every cut point of ``backbone`` (a Backbone or TransferModel) on frozen features.

    Features of all ``cuts`` (names or a level: ``block``, ``layer``, ``all``) are extracted in one pass over each
    labelled data set (batches ``(image, label)`` or dicts with ``image``/``label``), flattened by ``policy``, and
    every probe of ``probes`` (registered ``probe`` analyses) runs on each cut with ``options[probe]``. Returns
    one row per (cut, probe); with ``output_dir`` writes ``probes.{csv,json,md,png}``.
    """
    names = resolve_cuts(backbone, cuts)
    options = dict(options or {})
    unknown = set(options) - set(probes)
    if unknown:
        raise AnalysisError(f"options given for probes that are not run: {', '.join(sorted(unknown))}")
    functions = {name: get_analysis("probe", name) for name in probes}
    flatten = dict(policy=policy, spatial_size=spatial_size, channels=channels, seed=seed, batch_size=batch_size,
                   device=device, progress=progress, return_labels=True)
    train_acts, train_y = collect_activations(backbone, train_data, names, **flatten)
    test_acts, test_y = collect_activations(backbone, test_data, names, **flatten)
    inner = _backbone_of(backbone)
    levels = {} if inner is None else {c.name: c.level for c in reversed(inner.cut_points)}
    rows = []
    for cut in names:
        for probe, fn in functions.items():
            try:
                result = fn(train_acts[cut], train_y, test_acts[cut], test_y, **options.get(probe, {}))
            except AnalysisError as error:
                raise AnalysisError(f"{probe} probe at cut point {cut!r}: {error}") from error
            rows.append({"cut": cut, "level": levels.get(cut), "features": int(train_acts[cut].shape[1]),
                         "probe": probe, **result})
    if output_dir is not None:
        metadata = {"backbone": getattr(inner, "name", type(backbone).__name__), "policy": policy,
                    "spatial_size": spatial_size, "channels": channels, "options": options}
        write_curves(output_dir, "probes", rows, x="cut", ys=["accuracy", "auroc"], metadata=metadata,
                     title="layer-wise probes", group="probe")
    return rows
