"""Model(s) + data in, report files out: what ``medtl3d analyze`` and the bundles' ``analysis.yaml``
(:mod:`medtl3d.analysis.bundle`) share: similarity, weight distance, re-initialisation and Grad-CAM reports."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch

from ..errors import AnalysisError
from ..reporting import write_curves, write_table
from ._registry import get_analysis
from .attribution import cam_mass_inside, save_cam_nifti, save_cam_png
from .reinit import reinit_robustness
from .similarity import model_similarity, write_similarity_matrix
from .weights import weight_distance


def checkpoint_states(model: torch.nn.Module, checkpoint: str) -> tuple[dict, dict]:
    """A loaded checkpoint model's initial and final (trained) states."""
    initial = getattr(model, "initial_state", None)
    if not initial:
        raise AnalysisError(f"checkpoint {checkpoint} holds no initial_state to compare with")
    return initial, {k: v.detach().clone() for k, v in model.state_dict().items()}


def initial_model(model: torch.nn.Module, checkpoint: str) -> torch.nn.Module:
    """A copy of a loaded checkpoint model with its initial weights (what fine-tuning started from)."""
    twin = copy.deepcopy(model)
    twin.load_state_dict(checkpoint_states(model, checkpoint)[0])
    return twin


def _stem(path: str) -> str:
    return Path(path).stem


def similarity_report(model_a: torch.nn.Module, model_b: torch.nn.Module, loader, output, names: tuple[str, str], *,
                      cuts="block", cuts_b=None, measure: str = "debiased_cka", policy: str | None = None,
                      spatial_size: int | None = None, channels: int | None = None, batch_size: int = 8,
                      estimator: str = "exact", progress: bool = False, metadata: dict | None = None) -> Path:
    """Layer x layer ``measure`` of two models on ``loader``: ``<measure>.{csv,json,md,png}`` under ``output``."""
    names_a, names_b, matrix = model_similarity(
        model_a, model_b, loader, cuts, cuts_b, measure, policy=policy, spatial_size=spatial_size,
        channels=channels, batch_size=batch_size, estimator=estimator, progress=progress)
    metadata = {**(metadata or {}), "policy": policy or ("flatten" if measure.endswith("cka") else "spatial"),
                "spatial_size": spatial_size, "channels": channels, "estimator": estimator}
    return write_similarity_matrix(output, names_a, names_b, matrix, measure, model_a=names[0], model_b=names[1],
                                   metadata=metadata)["png"]


def weights_report(model: torch.nn.Module, checkpoint: str, output, per: str = "unit",
                   include_norm: bool = False) -> Path:
    """Per-layer distance of a checkpoint model's initial and final weights: ``weights.{csv,json,md,png}``."""
    rows = weight_distance(*checkpoint_states(model, checkpoint), model, per=per, include_norm=include_norm)
    metadata = {"checkpoint": str(checkpoint), "per": per, "include_norm": include_norm}
    return write_curves(output, "weights", rows, "layer", ["l2_rms", "relative_l2", "cosine"], metadata,
                        title=f"{_stem(checkpoint)}: initial vs final weights")["png"]


def reinit_report(model: torch.nn.Module, checkpoint: str, evaluate, output, metric: str, *,
                  modes=("reinit", "rerand"), groups: str = "unit", include_head: bool = False, seed: int = 0,
                  metadata: dict | None = None) -> Path:
    """Re-initialisation robustness of a checkpoint model, ``evaluate(model)`` giving ``metric``:
    ``reinit.{csv,json,md,png}``."""
    initial, final = checkpoint_states(model, checkpoint)
    rows = reinit_robustness(initial, final, model, evaluate, modes=modes, groups=groups, include_head=include_head,
                             seed=seed)
    metadata = {"checkpoint": str(checkpoint), "metric": metric, "groups": groups, **(metadata or {})}
    return write_curves(output, "reinit", rows, "layer", ["metric", "drop"], metadata,
                        title=f"{_stem(checkpoint)}: re-initialisation robustness ({metric})", group="mode")["png"]


def gradcam_report(model: torch.nn.Module, cases, output, *, method: str = "gradcam", cut: str | None = None,
                   class_idx: int | None = None, slices: int = 6, metadata: dict | None = None,
                   title: str = "") -> Path:
    """Grad-CAM overlays of ``cases``, ``(case id, image, label or None, lesion mask or None)`` tuples: per case
    ``<case>_<method>.png`` and, in 3D, ``<case>_<method>.nii.gz`` (with the image's affine; for a plain tensor
    without one, ``<case>_image.nii.gz`` beside it, so the two overlay in a viewer), and ``<method>.{csv,json,md}``
    (prediction, and CAM mass inside the lesion where a mask is given)."""
    explain = get_analysis("attribution", method)
    output = Path(output)
    rows = []
    for case, image, label, mask in cases:
        cam = explain(model, image, cut=cut, class_idx=class_idx)
        x = image.as_tensor() if hasattr(image, "as_tensor") else torch.as_tensor(image)
        with torch.no_grad():
            logits = model(x[None].float().to(next(model.parameters()).device))[0].cpu()
        if logits.numel() == 1:
            probability = float(torch.sigmoid(logits[0]))
            predicted = int(probability >= 0.5)
        else:
            probabilities = torch.softmax(logits, dim=0)
            probability, predicted = float(probabilities.max()), int(probabilities.argmax())
        row = {"case": case, "label": label, "predicted": predicted, "probability": probability}
        save_cam_png(output / f"{case}_{method}.png", image, cam, title=f"{case} {method}", slices=slices)
        if cam.ndim == 3:
            affine = getattr(image, "affine", None)
            save_cam_nifti(output / f"{case}_{method}.nii.gz", cam, affine)
            if affine is None:
                save_cam_nifti(output / f"{case}_image.nii.gz", x.float().mean(dim=0))
        if mask is not None:
            row["lesion_share"] = float((torch.as_tensor(mask) != 0).float().mean())
            row["cam_mass_inside"] = cam_mass_inside(cam, mask) if row["lesion_share"] > 0 else float("nan")
        rows.append(row)
    summary = {**(metadata or {}), "method": method, "cut": cut}
    if any("cam_mass_inside" in row for row in rows):
        masses = [r["cam_mass_inside"] for r in rows if np.isfinite(r.get("cam_mass_inside", np.nan))]
        summary["mean_cam_mass_inside"] = float(np.mean(masses)) if masses else None
        summary["cases_with_lesion"] = len(masses)
    write_table(output, method, rows, summary, title=title or method)
    return output
