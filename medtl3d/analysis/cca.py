"""The CCA family of :mod:`medtl3d.analysis.similarity`: CCA, SVCCA (Raghu et al. 2017) and PWCCA (Morcos et al.
2018), reproducing google/svcca's ``cca_core`` / ``pwcca`` (validated against ``shared/fixtures/svcca_reference.npz``)."""

from __future__ import annotations

import math

import numpy as np

from ..errors import AnalysisError
from ._registry import register_analysis
from ._pairs import CCA_POLICY, UndefinedSimilarityError, prepare_pair


def _numpy_pair(x, y, policy, spatial_size, channels, seed) -> tuple[np.ndarray, np.ndarray]:
    fx, fy = prepare_pair(x, y, policy, spatial_size, channels, seed)
    return fx.cpu().numpy(), fy.cpu().numpy()


def _need_datapoints(n: int, p: int, q: int, what: str) -> None:
    if n <= p + q:
        raise AnalysisError(
            f"{what} needs more datapoints than the two sides' features together: got {n} datapoints for {p} + {q} "
            f"features, need at least {p + q + 1} (otherwise some canonical correlations are 1 by construction); "
            "use more inputs, the 'spatial' policy, fewer channels (channels=...) or SVCCA"
        )


def _inv_sqrt(sigma: np.ndarray) -> np.ndarray:
    """``sigma^(-1/2)`` of a symmetric PSD matrix, pseudo-inverse style (null directions map to 0)."""
    w, v = np.linalg.eigh(sigma)
    cutoff = max(w.max(), 0.0) * sigma.shape[0] * np.finfo(np.float64).eps
    inv = np.where(w > cutoff, 1.0 / np.sqrt(np.where(w > cutoff, w, 1.0)), 0.0)
    return (v * inv) @ v.T


def _cca(x: np.ndarray, y: np.ndarray, epsilon: float, what: str = "CCA") -> dict:
    """CCA of ``(n, p)`` and ``(n, q)`` as google/svcca's ``cca_core.get_cca_similarity`` does it.

    Covariances (N-1 normalised) are rescaled by their largest entry, features whose rescaled variance is below
    ``epsilon`` are dropped, ``epsilon * I`` is added, and the canonical correlations are the singular values of
    ``Sxx^-1/2 Sxy Syy^-1/2``. Returns ``rho`` (descending), the rotations ``u``/``vt``, kept-feature masks and means.
    """
    n, p = x.shape
    q = y.shape[1]
    _need_datapoints(n, p, q, what)
    mx, my = x.mean(0), y.mean(0)
    xc, yc = x - mx, y - my
    sxx, syy, sxy = xc.T @ xc / (n - 1), yc.T @ yc / (n - 1), xc.T @ yc / (n - 1)
    xmax, ymax = np.abs(sxx).max(), np.abs(syy).max()
    if xmax == 0 or ymax == 0:
        raise UndefinedSimilarityError(f"{what} is undefined: {'x' if xmax == 0 else 'y'} is constant across "
                                       "datapoints")
    sxx, syy, sxy = sxx / xmax, syy / ymax, sxy / math.sqrt(xmax * ymax)
    keep_x, keep_y = np.abs(np.diag(sxx)) >= epsilon, np.abs(np.diag(syy)) >= epsilon
    sxx, syy, sxy = sxx[np.ix_(keep_x, keep_x)], syy[np.ix_(keep_y, keep_y)], sxy[np.ix_(keep_x, keep_y)]
    ix = _inv_sqrt(sxx + epsilon * np.eye(len(sxx)))
    iy = _inv_sqrt(syy + epsilon * np.eye(len(syy)))
    u, s, vt = np.linalg.svd(ix @ sxy @ iy)
    return {"rho": np.abs(s), "u": u, "vt": vt, "keep_x": keep_x, "keep_y": keep_y, "mean_x": mx, "mean_y": my}


def cca_coefficients(x, y, *, epsilon: float = 1e-10, policy: str = CCA_POLICY, spatial_size=None,
                     channels: int | None = None, seed: int = 0) -> np.ndarray:
    """Canonical correlations ``rho`` (descending, ``min(p, q)`` of them)."""
    return _cca(*_numpy_pair(x, y, policy, spatial_size, channels, seed), epsilon)["rho"]


@register_analysis("similarity", "cca")
def cca(x, y, **options) -> float:
    """Mean canonical correlation (google/svcca's mean of ``cca_coef1``)."""
    return float(cca_coefficients(x, y, **options).mean())


def _top_directions(a: np.ndarray, k: int | None, variance: float, name: str) -> np.ndarray:
    """``a`` centred and projected on its top singular directions: ``k`` of them, or as many as explain
    ``variance`` of the total variance (squared singular values)."""
    centred = a - a.mean(0)
    w, v = np.linalg.eigh(centred.T @ centred)
    w, v = np.clip(w[::-1], 0.0, None), v[:, ::-1]
    if w.sum() == 0:
        raise UndefinedSimilarityError(f"SVCCA is undefined: {name} is constant across datapoints")
    if k is None:
        k = int(np.searchsorted(np.cumsum(w) / w.sum(), variance - 1e-12) + 1)
    return centred @ v[:, : min(k, a.shape[1])]


@register_analysis("similarity", "svcca")
def svcca(x, y, *, k: int | None = None, variance: float = 0.99, epsilon: float = 1e-10,
          policy: str = CCA_POLICY, spatial_size=None, channels: int | None = None, seed: int = 0) -> float:
    """SVCCA (Raghu et al. 2017): each side reduced to its top singular directions (``k`` of them, or enough to
    explain ``variance``, default 99%), then the mean canonical correlation."""
    if k is not None and k < 1:
        raise AnalysisError(f"k must be >= 1, got {k}")
    if not 0 < variance <= 1:
        raise AnalysisError(f"variance must be in (0, 1], got {variance}")
    fx, fy = _numpy_pair(x, y, policy, spatial_size, channels, seed)
    rx, ry = _top_directions(fx, k, variance, "x"), _top_directions(fy, k, variance, "y")
    return float(_cca(rx, ry, epsilon, "SVCCA")["rho"].mean())


@register_analysis("similarity", "pwcca")
def pwcca(x, y, *, epsilon: float = 1e-10, policy: str = CCA_POLICY, spatial_size=None,
          channels: int | None = None, seed: int = 0) -> float:
    """Projection-weighted CCA (Morcos et al. 2018) as google/svcca's ``pwcca.compute_pwcca`` computes it.

    The weights come from the side with fewer features (``x`` on a tie), which is passed to the CCA first, as the
    reference expects: its activations rotated by the CCA rotation (plus its feature means, as the reference
    does) are orthonormalised (QR), and weight ``i`` is ``sum_j |<P_i, a_j>|`` over that side's features
    ``a_j``. Because of that mean offset the value depends on the singular vectors' signs (LAPACK's convention,
    as in the reference); ordering the sides makes ``pwcca(x, y) == pwcca(y, x)``.
    """
    fx, fy = _numpy_pair(x, y, policy, spatial_size, channels, seed)
    if fy.shape[1] < fx.shape[1]:
        fx, fy = fy, fx
    result = _cca(fx, fy, epsilon, "PWCCA")
    if result["keep_x"].sum() <= result["keep_y"].sum():
        acts, rotation, mean = fx[:, result["keep_x"]], result["u"].T, result["mean_x"][result["keep_x"]]
    else:
        acts, rotation, mean = fy[:, result["keep_y"]], result["vt"], result["mean_y"][result["keep_y"]]
    directions = rotation @ (acts - mean).T + mean[:, None]
    basis, _ = np.linalg.qr(directions.T)
    weights = np.abs(basis.T @ acts).sum(1)
    return float((weights * result["rho"]).sum() / weights.sum())
