"""Tests for kldiv.reductions: formulas, masks, global counts, gradient accumulation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kldiv

V = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
M = np.array([[True, False, True], [False, False, True]])


def test_formulas_without_mask():
    assert kldiv.reduce(V, "sum") == 21
    assert kldiv.reduce(V, "mean") == 3.5  # over all positions: token mean
    assert kldiv.reduce(V, "batchmean") == 10.5  # sum / leading axis (2)
    assert kldiv.reduce(V, "dataset", dataset_size=100) == 21 * 100 / 2
    np.testing.assert_array_equal(kldiv.reduce(V, "none"), V)


def test_formulas_with_mask():
    assert kldiv.reduce(V, "sum", mask=M) == 10
    assert kldiv.reduce(V, "mean", mask=M) == 10 / 3
    assert kldiv.reduce(V, "batchmean", mask=M) == 5
    assert kldiv.reduce(V, "dataset", mask=M, dataset_size=10) == 50
    np.testing.assert_array_equal(kldiv.reduce(V, "none", mask=M), np.where(M, V, 0))
    # a per-example mask broadcasts over tokens
    assert kldiv.reduce(V, "mean", mask=np.array([[True], [False]])) == 2.0
    # numeric masks are weights
    assert kldiv.reduce(V, "mean", mask=np.array([[0.5], [0.0]])) == 0.5 * 6 / 1.5


def test_masked_positions_never_leak():
    vals = jnp.array([1.0, jnp.nan, jnp.inf])
    mask = jnp.array([True, False, False])
    for r in ("sum", "mean", "batchmean"):
        assert kldiv.reduce(vals, r, mask=mask) in (1.0, 1 / 3)
        g = jax.grad(lambda v, r=r: kldiv.reduce(v, r, mask=mask))(vals)
        assert np.all(np.isfinite(g)) and g[1] == 0 and g[2] == 0


def test_all_masked_mean_is_zero_not_nan():
    out, g = jax.value_and_grad(lambda v: kldiv.reduce(v, "mean", mask=np.zeros((2, 3), bool)))(V)
    assert out == 0 and np.all(g == 0)


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="'none', 'sum', 'mean', 'batchmean', 'dataset'"):
        kldiv.reduce(V, "average")
    with pytest.raises(ValueError, match=r"\(3, 3\).*\(2, 3\)"):
        kldiv.reduce(V, "mean", mask=np.ones((3, 3), bool))
    with pytest.raises(ValueError, match="dataset_size"):
        kldiv.reduce(V, "dataset")
    with pytest.raises(ValueError, match="dataset_size"):
        kldiv.reduce(V, "mean", dataset_size=10)
    with pytest.raises(ValueError, match="count"):
        kldiv.reduce(V, "sum", count=3.0)
    with pytest.raises(ValueError, match="batch_size"):
        kldiv.reduce(V, "mean", batch_size=3)
    with pytest.raises(ValueError, match="scalar"):
        kldiv.reduce(jnp.float32(1.0), "batchmean")
    with pytest.raises(TypeError, match="int"):
        kldiv.reduce(np.ones(3, np.int32), "sum")


def test_output_dtype():
    assert kldiv.reduce(jnp.ones(4, jnp.float32), "mean").dtype == jnp.float32
    # 16-bit values are summed and counted in float32, which comes out (as everywhere in kldiv).
    assert kldiv.reduce(jnp.ones(4, jnp.bfloat16), "batchmean").dtype == jnp.float32
    assert kldiv.reduce(jnp.ones(4, jnp.bfloat16), "none").dtype == jnp.float32


def test_axis_name_uses_global_counts():
    """Under a named axis (vmap here, shard_map in test_multidevice) counts are global."""
    vals = jnp.array([[1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 30.0, 40.0]])  # 2 "devices"
    mask = jnp.array([[True, True, True, True], [True, False, False, False]])
    per_dev = jax.vmap(lambda v, m: kldiv.reduce(v, "mean", mask=m, axis_name="d"), axis_name="d")
    out = per_dev(vals, mask)
    np.testing.assert_allclose(out, [20 / 5, 20 / 5])  # not mean(2.5, 10) = 6.25
    bm = jax.vmap(lambda v: kldiv.reduce(v, "batchmean", axis_name="d"), axis_name="d")(vals)
    np.testing.assert_allclose(bm, [110 / 8] * 2)
    ds = jax.vmap(
        lambda v: kldiv.reduce(v, "dataset", dataset_size=80, axis_name="d"), axis_name="d"
    )(vals)
    np.testing.assert_allclose(ds, [110 * 80 / 8] * 2)


def _loss(params, x, mask, **kw):
    # per-token squared error as a stand-in for per-token KL values
    vals = jnp.sum((x @ params) ** 2, axis=-1)
    return kldiv.reduce(vals, "mean", mask=mask, **kw)


def test_gradient_accumulation_with_global_count_equals_full_batch():
    rng = np.random.default_rng(0)
    params = jnp.asarray(rng.normal(size=(3, 5)))
    x = jnp.asarray(rng.normal(size=(4, 5, 3)))  # 4 sequences × 5 tokens
    # micro-batches keep very different numbers of tokens
    mask = jnp.asarray([[1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 1, 0, 0], [0, 0, 0, 0, 1]], bool)
    full = jax.grad(_loss)(params, x, mask)
    count = kldiv.count_kept(mask)
    acc = sum(jax.grad(_loss)(params, x[i : i + 2], mask[i : i + 2], count=count) for i in (0, 2))
    np.testing.assert_allclose(acc, full, rtol=1e-12)
    naive = sum(jax.grad(_loss)(params, x[i : i + 2], mask[i : i + 2]) for i in (0, 2)) / 2
    assert not np.allclose(naive, full, rtol=1e-3)


def test_batchmean_accumulation_with_global_batch_size():
    rng = np.random.default_rng(1)
    vals = jnp.asarray(rng.normal(size=(6,)))
    full = kldiv.reduce(vals, "batchmean")
    acc = sum(kldiv.reduce(vals[i : i + 2], "batchmean", batch_size=6) for i in (0, 2, 4))
    np.testing.assert_allclose(acc, full, rtol=1e-12)
    assert kldiv.count_kept(None, shape=(4, 5)) == 20


def test_jit_compiles_once_per_configuration():
    traces = []

    @jax.jit
    def f(v):
        traces.append(1)
        return kldiv.reduce(v, "mean")

    for _ in range(3):
        f(jnp.ones(3))
    assert len(traces) == 1


def test_low_precision_sums_and_counts_accumulate_in_float32():
    assert float(kldiv.reduce(jnp.ones(70000, jnp.float16), "mean")) == 1.0
    assert float(kldiv.reduce(jnp.ones(70000, jnp.float16), "sum")) == 70000.0
    got = kldiv.reduce(jnp.ones(100000, jnp.float16), "dataset", dataset_size=100000)
    assert float(got) == 100000.0


def test_empty_batch_and_bad_counts():
    for red, extra in (("mean", {}), ("batchmean", {}), ("dataset", {"dataset_size": 10})):
        assert float(kldiv.reduce(jnp.ones((0,)), red, **extra)) == 0.0
    v = jnp.ones(3)
    bad = [("mean", {"count": jnp.ones(3)}, ValueError), ("mean", {"count": -1.0}, ValueError),
           ("batchmean", {"batch_size": 0}, ValueError),
           ("batchmean", {"batch_size": np.ones(2)}, ValueError),
           ("dataset", {"dataset_size": -5}, ValueError),
           ("dataset", {"dataset_size": "5"}, TypeError),
           ("mean", {"mask": jnp.array([1.0, np.nan, 1.0])}, ValueError),
           ("mean", {"mask": jnp.array([1.0, -1.0, 1.0])}, ValueError)]  # fmt: skip
    for red, kw, err in bad:
        with pytest.raises(err, match=next(iter(kw))):
            kldiv.reduce(v, red, **kw)
    # traced values cannot be checked: used as given (documented)
    f = jax.jit(lambda c: kldiv.reduce(v, "mean", count=c))
    assert float(f(jnp.float32(3.0))) == 1.0


def test_unknown_axis_name_is_named():
    with pytest.raises(ValueError, match="axis_name"):
        jax.vmap(lambda x: kldiv.reduce(x, "mean", axis_name="nope"), axis_name="batch")(
            jnp.ones((2, 3))
        )
