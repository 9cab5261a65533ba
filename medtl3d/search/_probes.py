"""Probe-based ranking of cut points before any fine-tuning.

The pretrained model's features at every cut point are extracted once over every non-test case (the bundle's
validation preprocessing; CTPA windows are averaged per series) and cached per cut point under the search folder.
For each validation fold a kNN and a linear probe (:mod:`medtl3d.analysis.probes`) are fitted on that fold's
training cases and scored on its validation cases; a cut's probe score is the mean validation AUROC over folds.
The same folds select fine-tuned models, so probe and fine-tuned scores are comparable and the test split is
never touched.
"""

from __future__ import annotations

import json
import math
from functools import partial
from pathlib import Path
from typing import Sequence

import torch
from scipy.stats import spearmanr

from ..analysis.activations import collect_activations
from ..analysis.probes import knn_probe, linear_probe
from ..backbones import CutPoint
from ..errors import SearchError
from ..reporting import atomic_write, write_text
from ._bundle import BundleTask

PROBES = ("knn", "linear")


def _item_key(item: dict) -> str:
    return json.dumps(item, sort_keys=True, default=str)


def _case_features(task: BundleTask, items: list[dict], names: list[str], cache: Path, batch_size: int,
                   device) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """``{cut: (cases, features)}`` and ``(cases,)`` labels, from the cache when it holds exactly these cases."""
    keys = [_item_key(item) for item in items]
    index_file = cache / "cases.json"
    files = {name: cache / f"{name.replace('/', '_')}.pt" for name in names}
    if index_file.is_file() and json.loads(index_file.read_text()) == keys and all(f.is_file() for f in files.values()):
        loaded = {name: torch.load(path, weights_only=True) for name, path in files.items()}
        return {name: value["features"] for name, value in loaded.items()}, loaded[names[0]]["labels"]
    model, dataset = task.probe_inputs(items)
    model.eval()
    acts, labels = collect_activations(model, dataset, names, policy="pooled", batch_size=batch_size,
                                       device=device, return_labels=True, progress=True)
    owner = torch.tensor([w[0] for w in dataset.windows] if hasattr(dataset, "windows") else range(len(items)))
    counts = torch.bincount(owner, minlength=len(items)).clamp(min=1).unsqueeze(1)
    case_labels = torch.zeros(len(items), dtype=torch.long).index_reduce_(0, owner, labels.reshape(-1).long(),
                                                                         "amax", include_self=False)
    features = {}
    for name in names:
        x = acts[name].double()
        features[name] = torch.zeros(len(items), x.shape[1], dtype=x.dtype).index_add_(0, owner, x) / counts
        atomic_write(files[name], partial(torch.save, {"features": features[name], "labels": case_labels}))
    write_text(index_file, json.dumps(keys))
    return features, case_labels


def probe_ranking(task: BundleTask, cuts: Sequence[CutPoint], folds: Sequence[int], cache_dir: str | Path, *,
                  batch_size: int = 8, device=None, knn_k: int = 20) -> list[dict]:
    """One row per cut point: mean (and std) over ``folds`` of the kNN and linear probes' validation AUROC."""
    if task.task not in ("binary", "multiclass"):
        raise SearchError(f"probe ranking needs single-label classes; bundle {task.name} has task {task.task!r}")
    splits = {fold: task.split(fold) for fold in folds}
    first = splits[folds[0]]
    items = first["train"] + first["val"]
    position = {_item_key(item): i for i, item in enumerate(items)}
    names = [c.name for c in cuts]
    features, labels = _case_features(task, items, names, Path(cache_dir), batch_size, device)
    rows = []
    for cut in cuts:
        scores: dict[str, list[float]] = {p: [] for p in PROBES}
        for fold in folds:
            train = torch.tensor([position[_item_key(i)] for i in splits[fold]["train"]])
            val = torch.tensor([position[_item_key(i)] for i in splits[fold]["val"]])
            x = features[cut.name]
            scores["knn"].append(knn_probe(x[train], labels[train], x[val], labels[val], k=knn_k)["auroc"])
            scores["linear"].append(linear_probe(x[train], labels[train], x[val], labels[val])["auroc"])
        row = {"cut": cut.name, "unit": cut.unit, "level": cut.level, "features": int(features[cut.name].shape[1])}
        for probe, values in scores.items():
            finite = [v for v in values if not math.isnan(v)]
            row[f"{probe}_auroc"] = sum(finite) / len(finite) if finite else math.nan
            row[f"{probe}_auroc_std"] = (torch.tensor(finite).std().item() if len(finite) > 1 else 0.0) if finite \
                else math.nan
        rows.append(row)
    return rows


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation (average ranks for ties); NaN with fewer than 3 finite pairs."""
    pairs = [(a, b) for a, b in zip(x, y) if not (math.isnan(a) or math.isnan(b))]
    if len(pairs) < 3:
        return math.nan
    value = spearmanr([a for a, _ in pairs], [b for _, b in pairs]).statistic
    return float(value)
