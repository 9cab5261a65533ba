"""Domain distance between a source and a target data set: Fréchet distance of pretrained, pooled features.

Matsoukas et al. (2022) relate the benefit of transfer to how far the target domain lies from the source domain.
The distance is the Fréchet (2-Wasserstein) distance between Gaussians fitted to the two sets of features of one
pretrained backbone, as in FID:

    d^2 = ||mu_s - mu_t||^2 + Tr(S_s + S_t - 2 (S_s S_t)^(1/2))

The formula and its numerical safeguards follow pytorch-fid's ``calculate_frechet_distance`` (``scipy.linalg.sqrtm``;
an ``eps * I`` offset when the product is singular; a negligible imaginary part dropped, a large one refused).
pytorch-fid itself is tied to Inception-v3 features of RGB images, so the ten lines are kept here for any
backbone, 2D or 3D.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import linalg
from torch import nn

from ..errors import AnalysisError
from .activations import collect_activations
from .weights import split_model


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (``np.cov``, N-1 normalised) of ``(N, D)`` features."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2:
        raise AnalysisError(f"features must be (N, D), got shape {x.shape}")
    if x.shape[0] < 2:
        raise AnalysisError(f"a covariance needs at least 2 datapoints, got {x.shape[0]}")
    if not np.isfinite(x).all():
        raise AnalysisError("features contain NaN or inf")
    return x.mean(axis=0), np.atleast_2d(np.cov(x, rowvar=False))


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2) (squared 2-Wasserstein distance)."""
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise AnalysisError(
            f"Gaussians of different dimension: means {mu1.shape} and {mu2.shape}, covariances {sigma1.shape} and "
            f"{sigma2.shape}"
        )
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise AnalysisError(
                f"the covariance product's square root has a large imaginary part ({np.abs(covmean.imag).max():.3g}):"
                " too few datapoints for the feature dimension; use more cases or fewer features"
            )
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def domain_distance(source_features, target_features, eps: float = 1e-6) -> float:
    """Fréchet distance between two ``(N, D)`` feature sets (their sizes may differ)."""
    mu_s, sigma_s = feature_statistics(source_features)
    mu_t, sigma_t = feature_statistics(target_features)
    return frechet_distance(mu_s, sigma_s, mu_t, sigma_t, eps)


def domain_distances(model: nn.Module, source_data, target_data, cuts: str | Sequence[str] | None = None, *,
                     batch_size: int = 32, device=None, eps: float = 1e-6, progress: bool = False) -> list[dict]:
    """Fréchet distance of pooled features at each cut point (default: the backbone's last) of ``model`` (a
    Backbone or TransferModel, e.g. the pretrained backbone) between two data sets: rows
    ``cut, features, source_cases, target_cases, frechet_distance``.

    ``source_data`` / ``target_data`` are what :func:`~medtl3d.analysis.activations.collect_activations` takes (a
    DataLoader, a Dataset, batches or one tensor); labels are not needed.
    """
    backbone, _ = split_model(model)
    cuts = backbone.cut_points[-1].name if cuts is None else cuts
    options = dict(batch_size=batch_size, device=device, progress=progress)
    source = collect_activations(model, source_data, cuts, "pooled", **options)
    target = collect_activations(model, target_data, list(source), "pooled", **options)
    return [{"cut": cut, "features": int(source[cut].shape[1]), "source_cases": int(source[cut].shape[0]),
             "target_cases": int(target[cut].shape[0]),
             "frechet_distance": domain_distance(source[cut].double().numpy(), target[cut].double().numpy(), eps)}
            for cut in source]
