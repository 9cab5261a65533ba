"""Representation similarity: agreement with the google/svcca reference fixture, exact streaming debiased CKA,
invariances, 5D activations, layer matrices and clear errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from medtl3d.analysis._registry import get_analysis
from medtl3d.analysis.similarity import (
    MinibatchCKA,
    cca,
    cca_coefficients,
    debiased_cka,
    layer_similarity_matrix,
    linear_cka,
    pwcca,
    rbf_cka,
    svcca,
    write_similarity_matrix,
)
from medtl3d.errors import AnalysisError

SHARED = Path(__file__).resolve().parents[2] / "shared"
FIXTURE = SHARED / "fixtures" / "svcca_reference.npz"
MEASURES = ("linear_cka", "debiased_cka", "rbf_cka", "cca", "svcca", "pwcca")


@pytest.fixture(scope="module")
def reference():
    if not FIXTURE.exists():
        pytest.skip(f"reference fixture {FIXTURE} is absent (needs ../shared next to the repository)")
    data = np.load(FIXTURE)
    # fixture arrays are (neurons, datapoints); ours are (datapoints, features)
    return {
        "mnist": (data["mnist_m0_l04"].T, data["mnist_m1_l04"].T),
        "synth": (data["synth_Y"].T, data["synth_X"].T),
        **{key: data[key] for key in data.files if not key.endswith(("l04", "_X", "_Y", "README"))},
    }


def naive_hsic(k: np.ndarray, l: np.ndarray, debiased: bool) -> float:
    """HSIC written out from the formulas, with explicit loops over the Gram matrices' off-diagonal entries."""
    n = k.shape[0]
    if not debiased:
        h = np.eye(n) - np.ones((n, n)) / n
        return float(np.trace(k @ h @ l @ h)) / (n - 1) ** 2
    kt, lt = k.copy(), l.copy()
    np.fill_diagonal(kt, 0)
    np.fill_diagonal(lt, 0)
    one = np.ones(n)
    return float(np.trace(kt @ lt) + (one @ kt @ one) * (one @ lt @ one) / ((n - 1) * (n - 2))
                 - 2.0 / (n - 2) * one @ kt @ lt @ one) / (n * (n - 3))


def naive_cka(x: np.ndarray, y: np.ndarray, debiased: bool) -> float:
    k, l = x @ x.T, y @ y.T
    return naive_hsic(k, l, debiased) / math.sqrt(naive_hsic(k, k, debiased) * naive_hsic(l, l, debiased))


# ---------------------------------------------------------------------------------------------------- fixture
@pytest.mark.parametrize("name", ["mnist", "synth"])
def test_cca_matches_reference(reference, name):
    a, b = reference[name]
    coefficients = cca_coefficients(a, b)
    expected = reference[f"{name}_cca_coefs"]
    assert coefficients.shape == expected.shape
    np.testing.assert_allclose(coefficients, expected, atol=1e-4, rtol=0)
    assert abs(cca(a, b) - float(reference[f"{name}_cca_mean"])) < 1e-4


@pytest.mark.parametrize("name", ["mnist", "synth"])
def test_svcca_and_pwcca_match_reference(reference, name):
    a, b = reference[name]
    assert abs(svcca(a, b, k=int(reference[f"{name}_svcca_k"])) - float(reference[f"{name}_svcca_mean"])) < 1e-4
    expected = float(reference[f"{name}_pwcca"])
    assert abs(pwcca(a, b) - expected) < 1e-4
    if a.shape[1] != b.shape[1]:  # the side with fewer features weights, whatever the order (x on a tie)
        assert abs(pwcca(b, a) - expected) < 1e-4


@pytest.mark.parametrize("name", ["mnist", "synth"])
def test_linear_cka_matches_reference(reference, name):
    a, b = reference[name]
    assert abs(linear_cka(a, b) - float(reference[f"{name}_linear_cka"])) < 1e-4
    assert abs(linear_cka(torch.as_tensor(a), torch.as_tensor(b)) - float(reference[f"{name}_linear_cka"])) < 1e-4


# ---------------------------------------------------------------------------------------------------- CKA
@pytest.mark.parametrize("n, p, q", [(60, 7, 5), (30, 80, 50)])  # feature-space and Gram code paths
def test_full_batch_cka_matches_naive_formulas(n, p, q):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(n, p)) + 3.0
    y = x[:, :q] @ rng.normal(size=(q, q)) + rng.normal(size=(n, q))
    assert linear_cka(x, y) == pytest.approx(naive_cka(x, y, False), abs=1e-10)
    assert debiased_cka(x, y) == pytest.approx(naive_cka(x, y, True), abs=1e-10)


def _random_split(rng: np.random.Generator, n: int, minimum: int = 4) -> list[int]:
    sizes, left = [], n
    while left >= 2 * minimum:
        size = int(rng.integers(minimum, left - minimum + 1))
        sizes.append(size)
        left -= size
    return sizes + [left]


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_streaming_debiased_cka_equals_full_batch(seed):
    rng = np.random.default_rng(seed)
    n = 50
    x = rng.normal(size=(n, 12)) * 4.0 + 10.0  # a large offset: the accumulation must not cancel badly
    y = np.tanh(x[:, :6] @ rng.normal(size=(6, 9))) + 0.5 * rng.normal(size=(n, 9))
    split = _random_split(rng, n)
    assert min(split) >= 4 and sum(split) == n
    # chunk_rows=1 adds every batch to the statistics at once; 9 merges some; 512 holds all until compute()
    for debiased, chunk_rows in ((True, 1), (True, 9), (True, 512), (False, 1)):
        accumulator = MinibatchCKA(debiased=debiased, chunk_rows=chunk_rows)
        start = 0
        for size in split:
            accumulator.update(torch.as_tensor(x[start:start + size]), torch.as_tensor(y[start:start + size]))
            start += size
        assert abs(accumulator.compute()[0, 0] - naive_cka(x, y, debiased)) < 1e-6, (split, debiased, chunk_rows)


def test_streaming_layer_matrix_equals_pairwise_full_batch():
    rng = np.random.default_rng(5)
    a = {"conv": rng.normal(size=(24, 3, 2, 2)), "fc": rng.normal(size=(24, 5))}
    b = {"l1": rng.normal(size=(24, 4, 2, 2, 2)), "l2": rng.normal(size=(24, 6)), "l3": rng.normal(size=(24, 2))}
    accumulator = MinibatchCKA(chunk_rows=1)
    for start in range(0, 24, 6):
        accumulator.update({k: v[start:start + 6] for k, v in a.items()}, {k: v[start:start + 6] for k, v in b.items()})
    names_a, names_b, expected = layer_similarity_matrix(a, b, "debiased_cka")
    assert (accumulator.names_x, accumulator.names_y) == (names_a, names_b) == (["conv", "fc"], ["l1", "l2", "l3"])
    np.testing.assert_allclose(accumulator.compute(), expected, atol=1e-6)
    # y=None compares the layers of x among themselves: a symmetric matrix with ones on the diagonal
    self_similarity = MinibatchCKA().update(a).compute()
    np.testing.assert_allclose(np.diag(self_similarity), 1.0, atol=1e-12)
    np.testing.assert_allclose(self_similarity, self_similarity.T, atol=1e-12)
    np.testing.assert_allclose(self_similarity, layer_similarity_matrix(a, a, "debiased_cka")[2], atol=1e-6)


@pytest.mark.parametrize("debiased", [True, False])
def test_gram_and_feature_space_accumulation_equal_full_batch(debiased):
    """Forced Gram space, forced feature space and the automatic choice all give the full-batch matrix. With
    8-row chunks and n=40 in the end, the automatic choice moves pairs over mid-stream (30 x 5 at n=8, 30 x 30 at
    n=32, 30 x 40 only in compute() at n=40) and keeps in Gram space the two with p_a p_b > n^2 = 1600."""
    rng = np.random.default_rng(7)
    n = 40
    a = {"wide": rng.normal(size=(n, 50)) + 5.0, "mid": rng.normal(size=(n, 30)), "thin": rng.normal(size=(n, 5))}
    b = {"mid": np.tanh(a["mid"] @ rng.normal(size=(30, 40))) + 0.3 * rng.normal(size=(n, 40)),
         "thin": rng.normal(size=(n, 3))}
    expected = layer_similarity_matrix(a, b, "debiased_cka" if debiased else "linear_cka")[2]
    for accumulation in ("gram", "features", "auto"):
        accumulator = MinibatchCKA(debiased=debiased, accumulation=accumulation, chunk_rows=8)
        for start in range(0, n, 5):
            accumulator.update({k: v[start:start + 5] for k, v in a.items()}, {k: v[start:start + 5] for k, v in b.items()})
        np.testing.assert_allclose(accumulator.compute(), expected, atol=1e-10, err_msg=accumulation)
        expected_gram = {"gram": set(accumulator._pair_keys()), "features": set(),
                         "auto": {(("x", "wide"), ("x", "wide")), (("x", "wide"), ("y", "mid"))}}[accumulation]
        assert accumulator._gram_pairs == expected_gram, accumulation
        if accumulation == "auto":  # rows are kept only for the layers of Gram-space pairs
            kept = {key for key, state in accumulator._layers.items() if state["rows"] is not None}
            assert kept == {("x", "wide"), ("y", "mid")}


def test_gram_space_keeps_wide_layers_within_memory_that_feature_space_exceeds():
    x = torch.randn(16, 3000, dtype=torch.float64)
    y = x[:, :2000] + 0.1 * torch.randn(16, 2000, dtype=torch.float64)
    budget = 2**20  # 1 MiB: 16 rows of both layers fit, 3000 x 2000 statistics (46 MiB) do not
    value = MinibatchCKA(max_bytes=budget).update(x, y).compute()[0, 0]
    assert value == pytest.approx(naive_cka(x.numpy(), y.numpy(), True), abs=1e-10)
    with pytest.raises(AnalysisError, match=r"0\.1 GiB.*3 feature-space pairs.*estimator='minibatch'"):
        MinibatchCKA(max_bytes=budget, accumulation="features").update(x, y)


def test_minibatch_estimator_averages_per_batch_unbiased_hsic():
    rng = np.random.default_rng(6)
    x, y = rng.normal(size=(20, 4)), rng.normal(size=(20, 3))
    x[:, 0] += y[:, 0]
    accumulator = MinibatchCKA(estimator="minibatch")
    hsic = np.zeros(3)
    for start in range(0, 20, 5):
        xb, yb = x[start:start + 5], y[start:start + 5]
        accumulator.update(torch.as_tensor(xb), torch.as_tensor(yb))
        k, l = xb @ xb.T, yb @ yb.T
        hsic += [naive_hsic(k, l, True), naive_hsic(k, k, True), naive_hsic(l, l, True)]
    assert accumulator.compute()[0, 0] == pytest.approx(hsic[0] / math.sqrt(hsic[1] * hsic[2]), abs=1e-10)
    with pytest.raises(AnalysisError, match="at least 4"):
        MinibatchCKA(estimator="minibatch").update(torch.zeros(3, 2), torch.zeros(3, 2))


@pytest.mark.parametrize("measure", ["linear_cka", "debiased_cka", "rbf_cka"])
def test_cka_identity_and_invariances(measure):
    fn = get_analysis("similarity", measure)
    rng = np.random.default_rng(7)
    x = rng.normal(size=(40, 6))
    y = x[:, :4] ** 2 + rng.normal(size=(40, 4))
    rotation, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    reference = fn(x, y)
    assert fn(x, x) == pytest.approx(1.0, abs=1e-10)
    assert fn(x @ rotation, y) == pytest.approx(reference, abs=1e-10)
    assert fn(3.7 * x, 0.2 * y) == pytest.approx(reference, abs=1e-10)
    assert fn(y, x) == pytest.approx(reference, abs=1e-10)


def test_cca_family_identity_and_invariance():
    rng = np.random.default_rng(8)
    x = rng.normal(size=(200, 5))
    y = x[:, :3] + 0.5 * rng.normal(size=(200, 3))
    mixing = rng.normal(size=(5, 5)) + 3 * np.eye(5)  # any invertible map leaves CCA unchanged
    assert cca(x, x) == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_allclose(cca_coefficients(x @ mixing, y), cca_coefficients(x, y), atol=1e-8)
    assert svcca(x, x, k=3) == pytest.approx(1.0, abs=1e-6)
    assert pwcca(x, x) == pytest.approx(1.0, abs=1e-6)


def test_svcca_variance_threshold_keeps_enough_directions():
    rng = np.random.default_rng(9)
    signal = rng.normal(size=(300, 2))
    x = np.hstack([signal * 10.0, 0.01 * rng.normal(size=(300, 4))])  # 2 directions hold > 99% of the variance
    y = signal @ rng.normal(size=(2, 3)) + 0.01 * rng.normal(size=(300, 3))
    assert svcca(x, y, variance=0.99) == pytest.approx(svcca(x, y, k=2), abs=1e-12)
    assert svcca(x, y, variance=0.99) > 0.99


# ---------------------------------------------------------------------------------------------------- 5D
@pytest.mark.parametrize("measure", MEASURES)
def test_every_measure_accepts_5d_activations(measure):
    fn = get_analysis("similarity", measure)
    g = torch.Generator().manual_seed(10)
    a = torch.randn(8, 4, 3, 5, 5, generator=g)
    b = torch.relu(a[:, :3] + 0.5 * torch.randn(8, 3, 3, 5, 5, generator=g))
    value = fn(a, b)
    assert math.isfinite(value) and -0.5 <= value <= 1.0 + 1e-9
    # the default policies: CKA flattens each map, the CCA family makes every voxel a datapoint
    if measure.endswith("cka"):
        assert value == pytest.approx(fn(a.reshape(8, -1), b.reshape(8, -1)), abs=1e-10)
    else:
        assert value == pytest.approx(fn(a.flatten(2).transpose(1, 2).reshape(-1, 4),
                                         b.flatten(2).transpose(1, 2).reshape(-1, 3)), abs=1e-10)
    assert math.isfinite(fn(a, b, policy="spatial", spatial_size=2))


def test_spatial_policy_pools_to_common_grid():
    g = torch.Generator().manual_seed(11)
    fine = torch.randn(4, 3, 4, 4, 4, generator=g)
    coarse = torch.nn.functional.avg_pool3d(fine, 2)
    # 4x4x4 is pooled to 2x2x2, so both sides see the same 32 datapoints: identical representations
    assert cca(fine, coarse) == pytest.approx(1.0, abs=1e-6)


# ---------------------------------------------------------------------------------------------------- errors
def test_mismatched_datapoints_are_refused():
    with pytest.raises(AnalysisError, match="x has 10 datapoints.*y has 12"):
        linear_cka(np.zeros((10, 3)), np.ones((12, 3)))
    with pytest.raises(AnalysisError, match="same inputs"):
        cca(torch.zeros(2, 3, 4, 4), torch.zeros(3, 3, 4, 4))


def test_cca_needs_more_datapoints_than_features():
    rng = np.random.default_rng(12)
    with pytest.raises(AnalysisError, match="need at least 21"):
        cca(rng.normal(size=(15, 12)), rng.normal(size=(15, 8)))
    with pytest.raises(AnalysisError, match="need at least 21"):
        pwcca(rng.normal(size=(20, 8)), rng.normal(size=(20, 12)))


@pytest.mark.parametrize("measure", MEASURES)
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_activations_are_refused(measure, bad):
    x = np.random.default_rng(13).normal(size=(30, 3))
    y = x.copy()
    y[4, 1] = bad
    with pytest.raises(AnalysisError, match="NaN" if np.isnan(bad) else "inf"):
        get_analysis("similarity", measure)(x, y)


def test_bad_options_and_memory_guard():
    with pytest.raises(AnalysisError, match="unknown flattening policy"):
        linear_cka(torch.zeros(4, 2, 3, 3), torch.zeros(4, 2, 3, 3), policy="mean")
    with pytest.raises(AnalysisError, match="estimator='minibatch'"):
        MinibatchCKA(max_bytes=1000).update(torch.randn(8, 64), torch.randn(8, 64))
    with pytest.raises(AnalysisError, match="unknown CKA estimator"):
        MinibatchCKA(estimator="average")
    with pytest.raises(AnalysisError, match="unknown CKA accumulation"):
        MinibatchCKA(accumulation="sketch")


# ---------------------------------------------------------------------------------------------------- outputs
def test_layer_matrix_records_undefined_entries_and_writes_reports(tmp_path):
    rng = np.random.default_rng(14)
    base = rng.normal(size=(16, 5))
    acts_a = {"a1": base, "dead": np.zeros((16, 5))}
    acts_b = {"b1": base @ rng.normal(size=(5, 5)), "b2": rng.normal(size=(16, 2, 2, 2))}
    names_a, names_b, matrix = layer_similarity_matrix(acts_a, acts_b, "linear_cka")
    assert matrix.shape == (2, 2)
    assert np.isnan(matrix[1]).all() and np.isfinite(matrix[0]).all()
    paths = write_similarity_matrix(tmp_path, names_a, names_b, matrix, "linear_cka", model_a="A", model_b="B")
    assert {p.suffix for p in paths.values()} == {".csv", ".json", ".md", ".png"}
    document = json.loads(paths["json"].read_text())
    assert document["rows"] == ["a1", "dead"] and document["columns"] == ["b1", "b2"]
    assert document["matrix"][0][0] == pytest.approx(matrix[0, 0]) and document["matrix"][1][0] is None
    assert paths["csv"].read_text().splitlines()[0] == "A,b1,b2"
    assert not list(tmp_path.glob("*.tmp*"))


def test_measures_are_registered():
    for name, fn in zip(MEASURES, (linear_cka, debiased_cka, rbf_cka, cca, svcca, pwcca)):
        assert get_analysis("similarity", name) is fn
    with pytest.raises(AnalysisError, match="available"):
        layer_similarity_matrix({"a": np.zeros((4, 2))}, {"b": np.zeros((4, 2))}, "no_such_measure")
