"""Claim 4's measurements: linear CKA by depth between each WT and RI run's initial and final model, and between
the two final models of one fold and seed, with the analysis suite (:func:`medtl3d.analysis.model_similarity` on
the bundle checkpoints' ``initial_state``, as the bundles' ``analysis.yaml`` ``cka``). Each fold x seed is measured
once and kept in the study's results store, so a re-run reads it back."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from monai.data import DataLoader

from ..analysis.reports import initial_model
from ..analysis.similarity import model_similarity
from ..inference import load_network

MEASURE = "linear_cka"
POLICY = "pooled"  # one feature per channel: cheap at any size (the bundles' analysis default)


def _diagonal(model_a, model_b, loader, cuts) -> tuple[list[str], list[float]]:
    names, _, matrix = model_similarity(model_a, model_b, loader, cuts, measure=MEASURE, policy=POLICY,
                                        batch_size=loader.batch_size)
    return list(names), [float(v) for v in np.diag(matrix)]


def cka_rows(store, records: Mapping[str, Sequence[Mapping]], dataset, cuts, batch_size: int) -> list[dict]:
    """One row per (fold, seed) that has both a WT and an RI run: ``depths``, ``wt`` / ``ri`` (CKA of initial vs
    final model per depth) and ``wt_vs_ri`` (the two final models); measured once, then read from ``store``."""
    saved = {r["key"]: r for r in store.of_kind("cka")}
    by_run = {label: {(r["fold"], r["seed"]): r for r in records.get(label, ())} for label in ("full", "random")}
    rows = []
    for run in sorted(set(by_run["full"]) & set(by_run["random"])):
        key = f"fold{run[0]}/seed{run[1]}"
        if key not in saved:
            loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
            models = {}
            for label in ("full", "random"):
                checkpoint = str(Path(by_run[label][run]["output_dir"]) / "model.pt")
                final = load_network(checkpoint).eval()
                models[label] = (initial_model(final, checkpoint).eval(), final)
            depths, wt = _diagonal(*models["full"], loader, cuts)
            _, ri = _diagonal(*models["random"], loader, cuts)
            _, across = _diagonal(models["full"][1], models["random"][1], loader, cuts)
            saved[key] = {"kind": "cka", "key": key, "fold": run[0], "seed": run[1], "depths": depths, "wt": wt,
                          "ri": ri, "wt_vs_ri": across, "measure": MEASURE, "policy": POLICY, "cases": len(dataset)}
            store.add(saved[key])
        rows.append(saved[key])
    return rows
