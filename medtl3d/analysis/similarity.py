"""Representation similarity of two activation sets: linear / debiased / RBF CKA, CCA, SVCCA and PWCCA.

Inputs are ``(datapoints, features)`` tensors or arrays whose rows describe the same inputs in the same order;
4D/5D conv activations ``(N, C, *spatial)`` are flattened by an explicit policy (see :mod:`.activations`): CKA
measures default to ``"flatten"`` (Kornblith et al. 2019), the CCA family to ``"spatial"`` (every position a
datapoint, as in Raghu et al. 2017; two maps of different size are average-pooled to the smaller grid). Everything
is computed in float64.

Why our own code: no maintained library fits. google/svcca is not a package (its ``cca_core`` / ``pwcca`` are the
reference the CCA family here reproduces, validated against ``shared/fixtures/svcca_reference.npz``), and torch-cka
averages per-minibatch HSICs in float32. The debiased CKA uses the unbiased HSIC estimator of Song et al. (2012),
as in Nguyen, Raghu & Kornblith (2021). :class:`MinibatchCKA` accumulates it over minibatches *exactly*, per layer
pair in whichever space is smaller: for linear kernels every term of the full-batch estimator is a sum over
datapoints of feature-space statistics (``X^T Y``, column sums, squared row norms and their products), which take
``O(p_x p_y)`` memory whatever the number of datapoints ``n``; a pair of wide layers keeps its rows instead and
computes the ``n x n`` Gram matrices at the end, as the full-batch computation does. Either way the streamed value
equals the full-batch one for any batch split. ``estimator="minibatch"`` gives instead the average of
per-minibatch unbiased HSICs of Nguyen et al. (2021) in ``O(batch^2)`` memory, for layers too wide for both.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from ..errors import AnalysisError
from ._registry import get_analysis, register_analysis
from ..reporting import write_matrix
from ._pairs import CCA_POLICY, CKA_POLICY, UndefinedSimilarityError, as_features, prepare_pair  # noqa: F401
from .activations import iter_paired_activations
from .cca import cca, cca_coefficients, pwcca, svcca  # noqa: F401

logger = logging.getLogger(__name__)

ESTIMATORS = ("exact", "minibatch")
ACCUMULATIONS = ("auto", "gram", "features")


# ---------------------------------------------------------------------------------------------------- HSIC
def _cka(hxy: float, hxx: float, hyy: float, what: str) -> float:
    if not (hxx > 0 and hyy > 0):
        raise UndefinedSimilarityError(
            f"{what} is undefined: a self-HSIC is not positive (x: {hxx:.3g}, y: {hyy:.3g}); the activations are "
            "constant across datapoints, or there are too few datapoints for the debiased estimator"
        )
    return float(hxy / math.sqrt(hxx * hyy))


def hsic_gram(k: torch.Tensor, l: torch.Tensor, debiased: bool) -> float:
    """HSIC of two ``(n, n)`` Gram matrices: ``tr(KHLH) / (n-1)^2``, or the unbiased estimator of Song et al.
    (2012), ``[tr(K~L~) + 1'K~1 1'L~1 / ((n-1)(n-2)) - 2/(n-2) 1'K~L~1] / (n(n-3))`` with zeroed diagonals."""
    n = k.shape[0]
    if not debiased:
        if n < 2:
            raise UndefinedSimilarityError(f"HSIC needs at least 2 datapoints, got {n}")
        kc = k - k.mean(0, keepdim=True) - k.mean(1, keepdim=True) + k.mean()
        return float((kc * l).sum() / (n - 1) ** 2)
    if n < 4:
        raise UndefinedSimilarityError(f"the unbiased HSIC needs at least 4 datapoints, got {n}")
    k = k - torch.diag(torch.diagonal(k))
    l = l - torch.diag(torch.diagonal(l))
    t1 = (k * l).sum()
    t2 = k.sum() * l.sum() / ((n - 1) * (n - 2))
    t3 = k.sum(1) @ l.sum(1)
    return float((t1 + t2 - 2.0 * t3 / (n - 2)) / (n * (n - 3)))


def _hsic_stats(c: torch.Tensor, sx: torch.Tensor, sy: torch.Tensor, kx: float, ky: float, kl: float,
                xl: torch.Tensor, yk: torch.Tensor, n: int, debiased: bool) -> float:
    """Linear-kernel HSIC from additive feature-space statistics of ``X`` (n, p) and ``Y`` (n, q).

    ``c = X'Y``, ``sx = X'1``, ``sy = Y'1``, ``kx = sum_i |x_i|^2``, ``ky = sum_i |y_i|^2``,
    ``kl = sum_i |x_i|^2 |y_i|^2``, ``xl = sum_i x_i |y_i|^2``, ``yk = sum_i y_i |x_i|^2``. With ``K = XX'``:
    ``tr(K~L~) = |X'Y|_F^2 - kl``, ``1'K~1 = |sx|^2 - kx`` and
    ``1'K~L~1 = sx'(X'Y)sy - sx'xl - sy'yk + kl``.
    """
    if not debiased:
        if n < 2:
            raise UndefinedSimilarityError(f"HSIC needs at least 2 datapoints, got {n}")
        centred = c - torch.outer(sx, sy) / n
        return float((centred * centred).sum() / (n - 1) ** 2)
    if n < 4:
        raise UndefinedSimilarityError(f"the unbiased HSIC needs at least 4 datapoints, got {n}")
    t1 = (c * c).sum() - kl
    t2 = ((sx @ sx) - kx) * ((sy @ sy) - ky) / ((n - 1) * (n - 2))
    t3 = sx @ (c @ sy) - sx @ xl - sy @ yk + kl
    return float((t1 + t2 - 2.0 * t3 / (n - 2)) / (n * (n - 3)))


def _feature_stats(za: torch.Tensor, zb: torch.Tensor, ka: torch.Tensor, kb: torch.Tensor) -> dict:
    """The additive statistics of :func:`_hsic_stats` for one pair, from (shifted) rows and their squared norms."""
    return {"c": za.T @ zb, "kl": float(ka @ kb), "xl": za.T @ kb, "yk": zb.T @ ka}


class MinibatchCKA:
    """Linear CKA (biased or debiased) of one or many layer pairs, accumulated over minibatches.

    ``update(x, y)`` takes one batch of activations: two tensors (one pair, named ``x`` and ``y``) or two dicts
    ``{layer: activation}`` (every layer of ``x`` against every layer of ``y``); ``y=None`` compares the layers of
    ``x`` among themselves. ``compute()`` returns the ``(layers_x, layers_y)`` matrix (NaN where undefined).

    ``estimator="exact"`` (default) gives the full-batch estimator's value for any batch split. Each layer pair
    ``(a, b)`` is accumulated in the smaller of two spaces (``accumulation="auto"``): feature space (the
    ``p_a x p_b`` statistics of :func:`_hsic_stats`, updated per chunk) once ``n^2 >= p_a p_b``, Gram space (the
    layers' rows kept, ``n x n`` Gram matrices built in :meth:`compute`, as the full-batch computation does) while
    ``n^2 < p_a p_b``. Pairs start in Gram space and move to feature space, initialised from the kept rows, when the
    growing ``n`` crosses over; a layer's rows are dropped once none of its pairs needs them. Memory is thus at most
    the full-batch computation's, and time is ``n^2 p`` per wide layer plus ``n p_a p_b`` per narrow pair instead
    of ``n p_a p_b`` for every pair. ``accumulation="features"`` / ``"gram"`` force one space for every pair. The
    memory held is checked against ``max_bytes`` at every batch; batches are buffered up to ``chunk_rows`` rows so
    that each statistics update is one large matrix product rather than many thin ones. ``estimator="minibatch"``
    averages per-batch HSICs (Nguyen et al. 2021; every batch needs at least 4 rows when debiased).
    """

    def __init__(self, *, debiased: bool = True, estimator: str = "exact", policy: str = CKA_POLICY,
                 spatial_size=None, channels: int | None = None, seed: int = 0, max_bytes: float = 4 * 2**30,
                 chunk_rows: int = 512, accumulation: str = "auto") -> None:
        if estimator not in ESTIMATORS:
            raise AnalysisError(f"unknown CKA estimator {estimator!r}; choose one of {', '.join(ESTIMATORS)}")
        if accumulation not in ACCUMULATIONS:
            raise AnalysisError(f"unknown CKA accumulation {accumulation!r}; choose one of {', '.join(ACCUMULATIONS)}")
        self.debiased, self.estimator, self.policy = debiased, estimator, policy
        self.accumulation = accumulation
        self.flatten = dict(policy=policy, spatial_size=spatial_size, channels=channels, seed=seed)
        self.max_bytes = max_bytes
        self.names_x: list[str] | None = None
        self.names_y: list[str] | None = None
        self.same = False
        self.n = 0
        self.batches = 0
        self._layers: dict[tuple[str, str], dict] = {}
        self._widths: dict[tuple[str, str], int] = {}
        self._pairs: dict[tuple, dict] = {}
        self._gram_pairs: set[tuple] = set()
        self._rows = 0
        self._hsic_cache: dict[tuple, float] = {}
        self.chunk_rows = chunk_rows
        self._buffer: list[dict] = []
        self._buffered = 0

    # ------------------------------------------------------------------ bookkeeping
    def _keys(self) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
        kx = [("x", n) for n in self.names_x]
        return kx, (kx if self.same else [("y", n) for n in self.names_y])

    def _pair_keys(self) -> list[tuple]:
        """The layer pairs whose HSIC is needed (HSIC is symmetric: within one model, each pair once)."""
        kx, ky = self._keys()
        if self.same:
            return [(a, b) for i, a in enumerate(kx) for b in kx[i:]]
        return [(a, b) for a in kx for b in ky] + [(a, a) for a in kx] + [(b, b) for b in ky]

    def _start(self, x: dict, y: dict | None, flat: dict) -> None:
        self.names_x, self.same = list(x), y is None
        self.names_y = list(x) if y is None else list(y)
        self._widths = {key: a.shape[1] for key, a in flat.items()}
        if self.estimator == "exact" and self.accumulation != "features":
            self._gram_pairs = set(self._pair_keys())

    def _in_gram_space(self, pair: tuple, n: int) -> bool:
        """Whether ``pair`` is (still) accumulated in Gram space once ``n`` rows have been seen."""
        if pair not in self._gram_pairs:
            return False
        return self.accumulation == "gram" or n * n < self._widths[pair[0]] * self._widths[pair[1]]

    def _check_memory(self, n: int) -> None:
        """Refuse a stream whose statistics (feature-space pairs; rows and Gram matrices of Gram-space layers)
        would exceed ``max_bytes`` with ``n`` rows."""
        gram = [pair for pair in self._pair_keys() if self._in_gram_space(pair, n)]
        gram_layers = {key for pair in gram for key in pair}
        features = sum(self._widths[a] * self._widths[b] for a, b in self._pair_keys() if (a, b) not in gram)
        size = 8 * (features + sum(n * self._widths[key] + n * n for key in gram_layers))
        if size > self.max_bytes:
            widest = max(self._widths.items(), key=lambda item: item[1])
            raise AnalysisError(
                f"exact streaming CKA would hold {size / 2**30:.1f} GiB of statistics after {n} datapoints "
                f"({len(gram_layers)} layers' rows and Gram matrices, {len(self._pair_keys()) - len(gram)} "
                f"feature-space pairs; widest layer {widest[0][1]!r}: {widest[1]} features under policy "
                f"{self.policy!r}), over max_bytes={self.max_bytes / 2**30:.1f} GiB; use estimator='minibatch', "
                "policy='pooled', or a smaller spatial_size / channels"
            )

    def _flatten(self, acts, side: str) -> dict[tuple[str, str], torch.Tensor]:
        return {(side, name): as_features(a, name=f"{side} layer {name!r}", **self.flatten) for name, a in acts.items()}

    # ------------------------------------------------------------------ accumulation
    def update(self, x, y=None) -> "MinibatchCKA":
        """Add one batch: ``x``/``y`` are tensors (one pair) or dicts of per-layer activations."""
        if not isinstance(x, Mapping):
            x, y = {"x": x}, (None if y is None else {"y": y})
        elif y is not None and not isinstance(y, Mapping):
            raise AnalysisError("x is a dict of layers but y is not: pass both as dicts or both as tensors")
        flat = self._flatten(x, "x")
        if y is not None:
            flat.update(self._flatten(y, "y"))
        rows = {key: a.shape[0] for key, a in flat.items()}
        if len(set(rows.values())) != 1:
            raise AnalysisError(
                f"layers of one batch have different datapoint counts {rows} under policy {self.policy!r}: with "
                "'spatial', give a common spatial_size"
            )
        (m,) = set(rows.values())
        if self.names_x is None:
            self._start(x, y, flat)
        elif list(x) != self.names_x or (y is not None and list(y) != self.names_y) or (y is None) != self.same:
            raise AnalysisError(f"this batch has layers {list(x)} / {None if y is None else list(y)}, earlier "
                                f"batches had {self.names_x} / {None if self.same else self.names_y}")
        if self.estimator == "exact":
            self._check_memory(self.n + m)
            self._buffer.append(flat)
            self._buffered += m
            if self._buffered >= self.chunk_rows:
                self._flush()
        else:
            self._update_minibatch(flat, m)
        self.n += m
        self.batches += 1
        self._hsic_cache.clear()
        return self

    def _flush(self) -> None:
        """Add the buffered rows: in-place products for feature-space pairs, kept rows for Gram-space layers; then
        move the pairs whose feature-space statistics have become the smaller ones there."""
        if not self._buffer:
            return
        buffer, self._buffer, self._buffered = self._buffer, [], 0
        # one layer at a time, each batch's part dropped as it is copied: at most one layer's rows held twice
        flat = {key: torch.cat([part.pop(key) for part in buffer]) for key in list(buffer[0])}
        self._rows += next(iter(flat.values())).shape[0]
        z, k = flat, {}  # the concatenated rows are ours: shifted in place
        for key, a in flat.items():
            state = self._layers.get(key)
            if state is None:  # shift by the first batch's mean: HSIC is unchanged, cancellation is smaller
                state = self._layers[key] = {"shift": a.mean(0), "s": 0.0, "k": 0.0, "rows": []}
            a.sub_(state["shift"])
            k[key] = (a * a).sum(1)
            state["s"] = state["s"] + z[key].sum(0)
            state["k"] = state["k"] + float(k[key].sum())
            if state["rows"] is not None:
                state["rows"].append(z[key])
        for (a, b), stats in self._pairs.items():
            stats["c"].addmm_(z[a].T, z[b])
            stats["kl"] += float(k[a] @ k[b])
            stats["xl"].addmv_(z[a].T, k[b])
            stats["yk"].addmv_(z[b].T, k[a])
        kept: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        for pair in [p for p in self._pair_keys() if p not in self._pairs and not self._in_gram_space(p, self._rows)]:
            for key in pair:
                if key not in kept:
                    rows = self._layers[key]["rows"] = [torch.cat(self._layers[key]["rows"])]
                    kept[key] = (rows[0], (rows[0] * rows[0]).sum(1))
            self._pairs[pair] = _feature_stats(kept[pair[0]][0], kept[pair[1]][0], kept[pair[0]][1], kept[pair[1]][1])
            self._gram_pairs.discard(pair)
        needed = {key for pair in self._gram_pairs for key in pair}
        for key, state in self._layers.items():
            if key not in needed:
                state["rows"] = None

    def _update_minibatch(self, flat: dict, m: int) -> None:
        if self.debiased and m < 4:
            raise AnalysisError(f"the per-minibatch unbiased HSIC needs batches of at least 4 datapoints, got {m}")
        grams = {key: a @ a.T for key, a in flat.items()}
        for a, b in self._pair_keys():
            self._pairs[(a, b)] = self._pairs.get((a, b), 0.0) + hsic_gram(grams[a], grams[b], self.debiased)

    # ------------------------------------------------------------------ result
    def _gram(self, key: tuple, grams: dict) -> torch.Tensor:
        """The ``n x n`` Gram matrix of a Gram-space layer's kept rows (built once per :meth:`compute`)."""
        if key not in grams:
            rows = self._layers[key]["rows"] = [torch.cat(self._layers[key]["rows"])]
            grams[key] = rows[0] @ rows[0].T
        return grams[key]

    def _hsic(self, a, b, grams: dict | None = None) -> float:
        self._flush()
        if (a, b) not in self._pairs and (a, b) not in self._gram_pairs:
            a, b = b, a
        if (a, b) in self._hsic_cache:
            return self._hsic_cache[(a, b)]
        if self.estimator == "minibatch":
            value = self._pairs[(a, b)] / self.batches
        elif (a, b) in self._gram_pairs:
            grams = {} if grams is None else grams
            value = hsic_gram(self._gram(a, grams), self._gram(b, grams), self.debiased)
        else:
            p, la, lb = self._pairs[(a, b)], self._layers[a], self._layers[b]
            value = _hsic_stats(p["c"], la["s"], lb["s"], la["k"], lb["k"], p["kl"], p["xl"], p["yk"], self.n,
                                self.debiased)
        self._hsic_cache[(a, b)] = value
        return value

    def compute(self) -> np.ndarray:
        """The ``(layers_x, layers_y)`` CKA matrix; an undefined entry is NaN (and logged)."""
        if self.names_x is None:
            raise AnalysisError("MinibatchCKA.compute() before any update(): no datapoints")
        kx, ky = self._keys()
        matrix = np.full((len(kx), len(ky)), np.nan)
        grams: dict = {}  # Gram matrices of this call only: freed when it returns
        for i, a in enumerate(kx):
            for j, b in enumerate(ky):
                try:
                    matrix[i, j] = _cka(self._hsic(a, b, grams), self._hsic(a, a, grams), self._hsic(b, b, grams),
                                        f"CKA of x layer {a[1]!r} and y layer {b[1]!r}")
                except UndefinedSimilarityError as error:
                    logger.warning("%s", error)
        return matrix


# ---------------------------------------------------------------------------------------------------- CKA
@register_analysis("similarity", "linear_cka")
def linear_cka(x, y, *, debiased: bool = False, policy: str = CKA_POLICY, spatial_size=None,
               channels: int | None = None, seed: int = 0) -> float:
    """Linear CKA (biased HSIC, Kornblith et al. 2019); ``debiased=True`` uses the unbiased HSIC."""
    fx, fy = prepare_pair(x, y, policy, spatial_size, channels, seed)
    n, p, q = fx.shape[0], fx.shape[1], fy.shape[1]
    what = "debiased linear CKA" if debiased else "linear CKA"
    if (p + q) ** 2 <= 2 * n * n:  # feature-space statistics are the smaller computation
        accumulator = MinibatchCKA(debiased=debiased, max_bytes=math.inf, accumulation="features")
        return _cka_from(accumulator.update(fx, fy), what)
    k, l = fx @ fx.T, fy @ fy.T
    return _cka(hsic_gram(k, l, debiased), hsic_gram(k, k, debiased), hsic_gram(l, l, debiased), what)


def _cka_from(accumulator: MinibatchCKA, what: str) -> float:
    a, b = ("x", "x"), ("y", "y")
    return _cka(accumulator._hsic(a, b), accumulator._hsic(a, a), accumulator._hsic(b, b), what)


@register_analysis("similarity", "debiased_cka")
def debiased_cka(x, y, **options) -> float:
    """Linear CKA with the unbiased HSIC estimator (Song et al. 2012; Nguyen et al. 2021)."""
    return linear_cka(x, y, debiased=True, **options)


def rbf_gram(x: torch.Tensor, sigma_fraction: float = 1.0) -> torch.Tensor:
    """RBF Gram ``exp(-d^2 / (2 sigma^2))`` with ``sigma = sigma_fraction * median pairwise distance``
    (the median of all squared distances, diagonal included, as in Kornblith et al.'s ``gram_rbf``)."""
    norms = (x * x).sum(1)
    sq = (norms[:, None] + norms[None, :] - 2.0 * (x @ x.T)).clamp_min(0.0)
    median = float(np.median(sq.cpu().numpy()))
    if median <= 0:
        raise UndefinedSimilarityError("RBF CKA is undefined: the median pairwise distance is 0 (most datapoints "
                                       "are identical)")
    return torch.exp(-sq / (2.0 * sigma_fraction**2 * median))


@register_analysis("similarity", "rbf_cka")
def rbf_cka(x, y, *, sigma_fraction: float = 1.0, debiased: bool = False, policy: str = CKA_POLICY,
            spatial_size=None, channels: int | None = None, seed: int = 0) -> float:
    """CKA with RBF kernels, bandwidth a fraction of the median distance (full batch: ``O(n^2)`` memory)."""
    if sigma_fraction <= 0:
        raise AnalysisError(f"sigma_fraction must be > 0, got {sigma_fraction}")
    fx, fy = prepare_pair(x, y, policy, spatial_size, channels, seed)
    k, l = rbf_gram(fx, sigma_fraction), rbf_gram(fy, sigma_fraction)
    return _cka(hsic_gram(k, l, debiased), hsic_gram(k, k, debiased), hsic_gram(l, l, debiased), "RBF CKA")


# ---------------------------------------------------------------------------------------------------- matrices
def _measure(measure: str | Callable) -> tuple[str, Callable]:
    if callable(measure):
        return getattr(measure, "__name__", "similarity"), measure
    return measure, get_analysis("similarity", measure)


def layer_similarity_matrix(acts_a: Mapping[str, object], acts_b: Mapping[str, object],
                            measure: str | Callable = "debiased_cka",
                            **options) -> tuple[list[str], list[str], np.ndarray]:
    """``(names_a, names_b, matrix)`` of ``measure(acts_a[i], acts_b[j], **options)`` for every layer pair.

    ``measure`` is a registered similarity name or a callable; an undefined entry (constant layer) is NaN.
    """
    name, fn = _measure(measure)
    names_a, names_b = list(acts_a), list(acts_b)
    if not names_a or not names_b:
        raise AnalysisError("layer_similarity_matrix needs at least one layer on each side")
    matrix = np.full((len(names_a), len(names_b)), np.nan)
    for i, a in enumerate(names_a):
        for j, b in enumerate(names_b):
            try:
                matrix[i, j] = fn(acts_a[a], acts_b[b], **options)
            except UndefinedSimilarityError as error:
                logger.warning("%s of %r and %r: %s", name, a, b, error)
            except AnalysisError as error:
                raise AnalysisError(f"{name} of layers {a!r} and {b!r}: {error}") from error
    return names_a, names_b, matrix


def write_similarity_matrix(output_dir: str | Path, names_a: Sequence[str], names_b: Sequence[str], matrix,
                            measure: str = "similarity", stem: str | None = None, model_a: str = "model A",
                            model_b: str = "model B", metadata: Mapping | None = None) -> dict[str, Path]:
    """Write a layer x layer similarity matrix as CSV, JSON, Markdown and a heatmap PNG (atomically)."""
    meta = {"measure": measure, "model_a": model_a, "model_b": model_b, **dict(metadata or {})}
    matrix = np.asarray(matrix, dtype=float)
    finite = matrix[np.isfinite(matrix)]
    lowest = min(0.0, float(finite.min())) if finite.size else 0.0  # debiased CKA can dip below 0
    return write_matrix(output_dir, stem or measure, matrix, list(names_a), list(names_b), meta,
                        title=f"{measure}: {model_a} vs {model_b}", value_label=measure, row_axis=model_a,
                        col_axis=model_b, vmin=lowest, vmax=1.0)


def model_similarity(model_a: torch.nn.Module, model_b: torch.nn.Module, data, cuts_a, cuts_b=None,
                     measure: str = "debiased_cka", *, policy: str | None = None, spatial_size=None,
                     channels: int | None = None, seed: int = 0, batch_size: int = 32, device=None,
                     estimator: str = "exact", output_dir: str | Path | None = None, progress: bool = False,
                     **options) -> tuple[list[str], list[str], np.ndarray]:
    """Layer x layer similarity of two models on the same data (``cuts_b`` defaults to ``cuts_a``).

    Linear and debiased CKA stream through :class:`MinibatchCKA` (``estimator``); other measures collect the
    flattened activations first. With ``output_dir`` the matrix is also written (see
    :func:`write_similarity_matrix`).
    """
    streaming = measure in ("linear_cka", "debiased_cka")
    policy = policy or (CKA_POLICY if measure.endswith("cka") else CCA_POLICY)
    flatten = dict(policy=policy, spatial_size=spatial_size, channels=channels, seed=seed, batch_size=batch_size,
                   device=device, progress=progress)
    pairs = iter_paired_activations(model_a, model_b, data, cuts_a, cuts_b, **flatten)
    if streaming:
        accumulator = MinibatchCKA(debiased=measure == "debiased_cka", estimator=estimator, policy=policy)
        for acts_a, acts_b in pairs:
            accumulator.update(acts_a, acts_b)
        names_a, names_b, matrix = accumulator.names_x, accumulator.names_y, accumulator.compute()
    else:
        parts_a: dict[str, list] = {}
        parts_b: dict[str, list] = {}
        for acts_a, acts_b in pairs:
            for parts, acts in ((parts_a, acts_a), (parts_b, acts_b)):
                for name, a in acts.items():
                    parts.setdefault(name, []).append(a.cpu())
        options.setdefault("policy", policy)
        names_a, names_b, matrix = layer_similarity_matrix(
            {k: torch.cat(v) for k, v in parts_a.items()}, {k: torch.cat(v) for k, v in parts_b.items()},
            measure, **options)
    if output_dir is not None:
        write_similarity_matrix(output_dir, names_a, names_b, matrix, measure,
                                model_a=getattr(model_a, "name", type(model_a).__name__),
                                model_b=getattr(model_b, "name", type(model_b).__name__),
                                metadata={"policy": policy, "spatial_size": spatial_size, "channels": channels,
                                          "estimator": estimator if streaming else "full-batch"})
    return names_a, names_b, matrix
