"""Tests for kldiv.fused_linear_topk.fused_linear_topk_kl against materialised student logits.

The reference materialises z = hidden @ weight and calls ``kl_topk_teacher`` (itself tested
against dense float64 definitions in tests/test_topk.py), then ``kldiv.reduce``; its gradients
come from plain autodiff through the materialised logits.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
from _grid import grid
from _jax_compat import enable_x64
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import kldiv
from kldiv.fused_linear_topk import fused_linear_topk_kl

N, H, V, K = 11, 5, 19, 4
TAILS = ("renormalize", "bucket")
REDUCTIONS = ("none", "sum", "mean", "batchmean", "dataset")


def _inputs(seed=0, n=N, k=K, v=V, dtype=np.float64):
    """Student hidden/weight and a teacher's top-k ids and log-probs (from its own logits)."""
    rng = np.random.default_rng(seed)
    hs = rng.normal(size=(n, H))
    ws = rng.normal(size=(H, v))
    teacher = rng.normal(size=(n, v)) * 2
    lpt = scipy.special.log_softmax(teacher, -1)
    ids = np.argsort(-lpt, -1)[:, :k]
    lp = np.take_along_axis(lpt, ids, -1)
    return ids, lp.astype(dtype), hs.astype(dtype), ws.astype(dtype)


def _pair(tail, reduction, *, mask=None, where=None, t=1.0, chunk_size=4, **extra):
    """(fused, materialised) as functions of (lp, hs, ws, t) returning (Σ cot·out, out)."""
    if reduction == "dataset":
        extra.setdefault("dataset_size", 1000)
    kw = dict(tail=tail, reduction=reduction, mask=mask, where=where, **extra)

    def cot(out):
        if out.ndim == 0:
            return out
        return jnp.sum(out * jnp.arange(1.0, out.size + 1).reshape(out.shape))

    def fused(ids, lp, hs, ws, t):
        out = fused_linear_topk_kl(ids, lp, hs, ws, temperature=t, chunk_size=chunk_size, **kw)
        return cot(out), out

    def ref(ids, lp, hs, ws, t):
        z = hs @ ws
        if "vocab_size" in kw:
            z = z[..., : kw["vocab_size"]]
        vals = kldiv.kl_topk_teacher(
            ids, lp, z, tail=tail, reduction="none", where=where, temperature=t
        )
        out = kldiv.reduce(
            vals,
            reduction,
            mask=mask,
            dataset_size=extra.get("dataset_size"),
            count=extra.get("count"),
        )
        return cot(out), out

    return fused, ref


def _check(tail, reduction, *, inputs=None, t=1.0, traced_t=False, rtol=1e-10, atol=1e-12, **kw):
    ids, lp, hs, ws = _inputs() if inputs is None else inputs
    fused, ref = _pair(tail, reduction, t=t, **kw)
    argnums = (1, 2, 3, 4) if traced_t else (1, 2, 3)
    t_arg = jnp.asarray(t, lp.dtype) if traced_t else None

    def run(f):
        g = lambda lp, hs, ws, tt: f(ids, lp, hs, ws, tt if traced_t else t)  # noqa: E731
        vg = jax.value_and_grad(g, tuple(a - 1 for a in argnums), has_aux=True)
        return jax.jit(vg)(lp, hs, ws, t_arg)

    (_, got), g_got = run(fused)
    (_, want), g_want = run(ref)
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol)
    for a, b in zip(g_got, g_want, strict=True):
        assert np.all(np.isfinite(np.asarray(a)))
        np.testing.assert_allclose(a, b, rtol=rtol * 10, atol=atol * 10)
    return got, g_got


@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_matches_materialised_values_and_gradients(tail, reduction):
    _check(tail, reduction, t=1.7)


@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_token_mask_and_padding_slots(tail, reduction):
    rng = np.random.default_rng(1)
    mask = rng.random(N) > 0.4
    where = np.ones((N, K), bool)
    where[:, 3:] = False
    where[2, 1:] = False
    ids, lp, hs, ws = _inputs(1)
    ids = np.where(where, ids, 0)  # padding slots hold junk
    lp = np.where(where, lp, np.nan)
    _check(tail, reduction, inputs=(ids, lp, hs, ws), mask=mask, where=where)


@pytest.mark.parametrize(*grid({"tail": TAILS, "reduction": ["mean", "none"]}))  # all: -m slow
def test_traced_temperature_and_its_gradient(tail, reduction):
    _check(tail, reduction, t=2.5, traced_t=True, inputs=_inputs(2))
    # under jit, a Python temperature and the same value traced agree
    ids, lp, hs, ws = _inputs(2)
    f = jax.jit(
        lambda t: fused_linear_topk_kl(ids, lp, hs, ws, tail=tail, reduction="sum", temperature=t)
    )
    want = fused_linear_topk_kl(ids, lp, hs, ws, tail=tail, reduction="sum", temperature=2.5)
    np.testing.assert_allclose(f(2.5), want, rtol=1e-12)


@pytest.mark.parametrize(*grid({"chunk_size": [1, 3, 11, 50], "reduction": ["mean", "none"]}))
def test_chunk_sizes_not_dividing_n(chunk_size, reduction):
    mask = np.random.default_rng(3).random(N) > 0.3
    _check("bucket", reduction, chunk_size=chunk_size, mask=mask)


def test_numeric_mask_weights_and_count():
    w = np.random.default_rng(4).random(N)
    w[[1, 7]] = 0
    _check("bucket", "sum", mask=w)
    _check("renormalize", "mean", mask=w > 0.5, count=5.0)


def test_k_equal_v_renormalize_is_kl_from_logits():
    rng = np.random.default_rng(5)
    teacher = rng.normal(size=(N, V)) * 2
    ids = np.stack([rng.permutation(V) for _ in range(N)])
    lp = np.take_along_axis(scipy.special.log_softmax(teacher, -1), ids, -1)
    _, _, hs, ws = _inputs(5)

    def f(hs, ws):
        return fused_linear_topk_kl(
            ids, lp, hs, ws, tail="renormalize", reduction="sum", chunk_size=3
        )

    def g(hs, ws):
        return jnp.sum(kldiv.kl_from_logits(teacher, hs @ ws))

    np.testing.assert_allclose(f(hs, ws), g(hs, ws), rtol=1e-12)
    for a, b in zip(jax.grad(f, (0, 1))(hs, ws), jax.grad(g, (0, 1))(hs, ws), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13)
    # bucket with k = V: the tail bin is empty on both sides, the same KL
    _check("bucket", "mean", inputs=(ids, lp, hs, ws), chunk_size=3)


def test_empty_teacher_tail_bucket_and_minus_inf_log_probs():
    ids, lp, hs, ws = _inputs(6)
    # rows whose top-k mass is exactly 1 (empty teacher tail bin)
    lp = lp.copy()
    lp[:4] = np.log(np.full(K, 1.0 / K))
    # −inf log-probs at kept slots (a teacher probability of 0)
    lp[5, 2] = -np.inf
    lp[6, :] = -np.inf  # a position where the teacher kept nothing with mass
    for tail in TAILS:
        got, grads = _check(tail, "none", inputs=(ids, lp, hs, ws))
        assert np.all(np.isfinite(got)) and np.all(np.asarray(got) >= 0)


def test_huge_hidden_states_stay_finite():
    ids, lp, hs, ws = _inputs(7)
    hs = hs * 1e4  # logits ~1e4–1e5: a naive softmax overflows
    for tail in TAILS:
        got, grads = _check(tail, "mean", inputs=(ids, lp, hs, ws), rtol=1e-8)
        assert np.isfinite(got)


def test_dropped_tokens_touch_nothing():
    ids, lp, hs, ws = _inputs(8)
    mask = np.ones(N, bool)
    mask[[0, 5]] = False
    hs_bad, lp_bad, ids_bad = hs.copy(), lp.copy(), ids.copy()
    hs_bad[[0, 5]] = np.nan
    lp_bad[5] = np.nan
    ids_bad[0] = V + 7  # out of range, but the token is dropped

    def f(ids, lp, hs, ws):
        return fused_linear_topk_kl(
            ids, lp, hs, ws, tail="bucket", reduction="mean", mask=mask, chunk_size=3
        )

    val, grads = jax.value_and_grad(f, (1, 2, 3))(ids_bad, lp_bad, hs_bad, ws)
    val_ok, grads_ok = jax.value_and_grad(f, (1, 2, 3))(ids, lp, hs, ws)
    np.testing.assert_allclose(val, val_ok, rtol=1e-13)
    np.testing.assert_allclose(grads[2], grads_ok[2], rtol=1e-12)
    for g in grads[:2]:
        g = np.asarray(g)
        assert np.all(g[[0, 5]] == 0) and np.all(np.isfinite(g))


def test_out_of_range_ids_give_nan_never_an_alias():
    ids, lp, hs, ws = _inputs(9)
    ids = ids.copy()
    ids[3, 1] = V  # beyond the vocabulary
    ids[4, 0] = -1
    for tail in TAILS:
        out = np.asarray(
            fused_linear_topk_kl(ids, lp, hs, ws, tail=tail, reduction="none", chunk_size=4)
        )
        ref = kldiv.kl_topk_teacher(ids, lp, hs @ ws, tail=tail, reduction="none")
        assert np.all(np.isnan(out[[3, 4]])) and np.all(np.isfinite(np.delete(out, [3, 4])))
        np.testing.assert_allclose(out, ref, rtol=1e-12)


def test_padded_vocabulary_columns():
    ids, lp, hs, _ = _inputs(10)
    ws = np.random.default_rng(10).normal(size=(H, V + 5))
    _, g = _check("bucket", "sum", inputs=(ids, lp, hs, ws), vocab_size=V)
    assert np.all(np.asarray(g[2])[:, V:] == 0)
    for bad in (0, V + 6, 2.5):
        with pytest.raises(ValueError, match="vocab_size"):
            fused_linear_topk_kl(ids, lp, hs, ws, tail="bucket", reduction="sum", vocab_size=bad)


def test_leading_shape_and_jit():
    ids, lp, hs, ws = _inputs(11, n=12)
    args = (ids.reshape(3, 4, K), lp.reshape(3, 4, K), hs.reshape(3, 4, H), ws)
    mask = np.arange(12).reshape(3, 4) % 5 != 0
    for reduction in ("none", "mean"):
        f = jax.jit(
            lambda *a, reduction=reduction: fused_linear_topk_kl(
                *a, tail="bucket", reduction=reduction, mask=mask, chunk_size=5
            )
        )
        out = f(*args)
        ref = kldiv.kl_topk_teacher(
            args[0], args[1], args[2] @ ws, tail="bucket", reduction=reduction, mask=mask
        )
        assert out.shape == ref.shape
        np.testing.assert_allclose(out, ref, rtol=1e-12)


@pytest.mark.parametrize("tail", TAILS)
def test_float32(tail):
    with enable_x64(False):
        ids, lp, hs, ws = _inputs(12, dtype=np.float32)
        _check(tail, "mean", inputs=(ids, lp, hs, ws), rtol=2e-5, atol=1e-6)
        _check(tail, "none", inputs=(ids, lp, hs, ws), rtol=2e-5, atol=1e-6, t=2.0)


def test_float32_accurate_when_student_matches_teacher():
    """p ≈ q: the float32 fused value keeps relative accuracy against float64."""
    rng = np.random.default_rng(13)
    hs, ws = rng.normal(size=(N, H)), rng.normal(size=(H, V))
    z = hs @ ws
    lpt = scipy.special.log_softmax(z + 1e-3 * rng.normal(size=z.shape), -1)
    ids = np.argsort(-lpt, -1)[:, :K]
    lp = np.take_along_axis(lpt, ids, -1)
    for tail in TAILS:
        want = kldiv.kl_topk_teacher(ids, lp, z, tail=tail, reduction="none")
        with enable_x64(False):
            got = fused_linear_topk_kl(
                ids, lp.astype(np.float32), hs.astype(np.float32), ws.astype(np.float32),
                tail=tail, reduction="none", chunk_size=4,
            )  # fmt: skip
        got = np.asarray(got, np.float64)
        assert np.all(got >= 0)
        np.testing.assert_allclose(got, want, rtol=2e-2, atol=1e-9)


def test_bf16_inputs():
    ids, lp, hs, ws = _inputs(14, n=12)
    cast = lambda x: jnp.asarray(x, jnp.bfloat16)  # noqa: E731
    f32 = lambda x: np.asarray(cast(x), np.float64)  # noqa: E731
    out = fused_linear_topk_kl(
        ids, cast(lp), cast(hs), cast(ws), tail="bucket", reduction="none", chunk_size=5
    )
    assert out.dtype == jnp.float32
    ref = kldiv.kl_topk_teacher(ids, f32(lp), f32(hs) @ f32(ws), tail="bucket", reduction="none")
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)
    grads = jax.grad(
        lambda lp, hs, ws: fused_linear_topk_kl(ids, lp, hs, ws, tail="bucket", reduction="mean"),
        (0, 1, 2),
    )(cast(lp), cast(hs), cast(ws))
    for g in grads:
        assert g.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(g, np.float32)))


def test_errors():
    ids, lp, hs, ws = _inputs()
    f = fused_linear_topk_kl
    with pytest.raises(ValueError, match="tail"):
        f(ids, lp, hs, ws, tail="drop", reduction="sum")
    with pytest.raises(ValueError, match="reduction"):
        f(ids, lp, hs, ws, tail="bucket", reduction="avg")
    with pytest.raises(TypeError, match="teacher_ids"):
        f(ids.astype(np.float64), lp, hs, ws, tail="bucket", reduction="sum")
    with pytest.raises(TypeError, match="teacher_log_probs"):
        f(ids, ids, hs, ws, tail="bucket", reduction="sum")
    with pytest.raises(ValueError, match="same shape"):
        f(ids, lp[:, :2], hs, ws, tail="bucket", reduction="sum")
    with pytest.raises(ValueError, match="leading"):
        f(ids[:5], lp[:5], hs, ws, tail="bucket", reduction="sum")
    with pytest.raises(ValueError, match=r"`student_hidden` \(11, 5\).*`student_weight` \(4, 19\)"):
        f(ids, lp, hs, ws[:4], tail="bucket", reduction="sum")
    with pytest.raises(TypeError, match="floating"):
        f(ids, lp, hs.astype(np.int32), ws, tail="bucket", reduction="sum")
    with pytest.raises(ValueError, match="temperature"):
        f(ids, lp, hs, ws, tail="bucket", reduction="sum", temperature=0.0)
    with pytest.raises(ValueError, match="temperature"):
        f(ids, lp, hs, ws, tail="bucket", reduction="sum", temperature=np.ones(N))
    with pytest.raises(ValueError, match="mask"):
        f(ids, lp, hs, ws, tail="bucket", reduction="sum", mask=np.ones(N + 1, bool))
    with pytest.raises(ValueError, match="where"):
        f(ids, lp, hs, ws, tail="bucket", reduction="sum", where=np.ones((N, K + 1), bool))
    with pytest.raises(ValueError, match="dataset_size"):
        f(ids, lp, hs, ws, tail="bucket", reduction="dataset")
    with pytest.raises(ValueError, match="temperature.*smallest normal float32"):
        f(
            ids,
            lp.astype(np.float32),
            hs.astype(np.float32),
            ws.astype(np.float32),
            tail="bucket",
            reduction="sum",
            temperature=1e-39,
        )
    for bad in (0, 2.7, True):
        with pytest.raises(ValueError, match="chunk_size"):
            f(ids, lp, hs, ws, tail="bucket", reduction="sum", chunk_size=bad)


@pytest.mark.parametrize("tail", TAILS)
def test_uint16_ids_of_a_65536_token_vocabulary(tail):
    """Ids are compared with V in a dtype that holds it: as a uint16, V = 65536 is 0, which
    put every id out of range (NaN)."""
    rng = np.random.default_rng(31)
    n, h, v = 3, 4, 65536
    hs, ws = rng.normal(size=(n, h)), 0.1 * rng.normal(size=(h, v))
    ids = np.array([[1, 40000, 65535], [7, 8, 9], [100, 200, 65534]])
    lp = np.log(np.full((n, 3), 0.2))

    def loss(i):
        return lambda w: fused_linear_topk_kl(i, lp, hs, w, tail=tail, reduction="mean")

    want, want_g = jax.value_and_grad(loss(ids))(ws)
    got, got_g = jax.value_and_grad(loss(ids.astype(np.uint16)))(ws)
    assert np.isfinite(want)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_allclose(got_g, want_g, rtol=1e-6, atol=1e-9)


def test_mixed_precision_head_differentiates_like_the_materialised_product():
    """bfloat16 hidden states against a float32 weight: the weight's float32 gradient keeps
    float32 accuracy (the cotangent enters xᵀ·dz unrounded, as in autodiff of ``h @ w``)."""
    ids, lp, hs, ws = _inputs(32, dtype=np.float32)
    hs = jnp.asarray(hs, jnp.bfloat16)

    def fused(w):
        return fused_linear_topk_kl(ids, lp, hs, w, tail="bucket", reduction="mean", chunk_size=4)

    def materialised(w):
        return kldiv.kl_topk_teacher(ids, lp, hs @ w, tail="bucket", reduction="mean")

    got, want = jax.grad(fused)(ws), jax.grad(materialised)(ws)
    assert got.dtype == want.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6 * float(jnp.max(jnp.abs(want))))


def test_empty_input():
    ids, lp, hs, ws = _inputs(n=0)
    assert fused_linear_topk_kl(ids, lp, hs, ws, tail="bucket", reduction="sum") == 0
    assert fused_linear_topk_kl(ids, lp, hs, ws, tail="bucket", reduction="none").shape == (0,)


def _temp_bytes(f, n, h, v, k):
    s = jax.ShapeDtypeStruct
    args = (s((n, k), jnp.int32), s((n, k), jnp.float32), s((n, h), jnp.float32))
    args += (s((h, v), jnp.float32),)
    grad = jax.jit(jax.value_and_grad(f, (1, 2, 3)))
    return grad.lower(*args).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("tail", TAILS)
def test_temporary_memory_far_below_the_materialised_path(tail):
    n, h, v, k = 2048, 256, 32768, 32

    def fused(ids, lp, hs, ws):
        return fused_linear_topk_kl(ids, lp, hs, ws, tail=tail, reduction="mean")

    def materialised(ids, lp, hs, ws):
        return kldiv.kl_topk_teacher(ids, lp, hs @ ws, tail=tail, reduction="mean")

    with enable_x64(False):
        ours = _temp_bytes(fused, n, h, v, k)
        peer = _temp_bytes(materialised, n, h, v, k)
    logits = n * v * 4
    assert peer >= logits  # the peer holds at least the [N, V] float32 logits
    assert ours <= 0.25 * peer, (ours, peer)
    assert ours <= 0.25 * logits, (ours, logits)


def _assert_shard_map_equals_unsharded(mesh, loss, sharded_loss, args):
    """Value and gradients (log-probs, hidden states, weight) of ``loss`` on whole arrays equal
    those of ``sharded_loss`` psum'd inside ``shard_map`` (tokens over "data", the weight
    replicated, default check_vma=True)."""
    argnums = (1, 2, 3)
    want = jax.value_and_grad(loss, argnums)(*args)

    def total(*xs):
        return jax.lax.psum(sharded_loss(*xs), "data")

    def step(*xs):
        return jax.value_and_grad(total, argnums)(*xs)

    in_specs = (P("data"), P("data"), P("data"), P(), P("data"))
    out_specs = (P(), (P("data"), P("data"), P()))
    got = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=in_specs, out_specs=out_specs))(*args)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-12)
    for g, w in zip(got[1], want[1], strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-13)


@pytest.mark.multidevice
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_under_shard_map_with_replicated_weight(reduction):
    """Data parallel: tokens (hidden states, ids, log-probs) sharded over 4 host devices, the
    student weight replicated; its gradient is summed over the shards."""
    if jax.device_count() < 4:
        pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=4")
    mesh = Mesh(np.array(jax.devices()[:4]), ("data",))
    ids, lp, hs, ws = _inputs(15, n=16)
    where = np.ones_like(ids, bool)
    where[::3, -1] = False

    def loss(ids, lp, hs, ws, where):
        out = fused_linear_topk_kl(
            ids, lp, hs, ws, tail="bucket", reduction=reduction, where=where, temperature=1.5,
            chunk_size=3,
        )  # fmt: skip
        return jnp.sum(out) if reduction == "none" else out

    _assert_shard_map_equals_unsharded(mesh, loss, loss, (ids, lp, hs, ws, where))


@pytest.mark.multidevice
@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_under_shard_map_with_a_sharded_token_mask(reduction):
    """A token mask sharded with the tokens (it varies over the mapped axis): the reduction's
    per-token weights are each shard's own, not summed over the shards; "mean" with the global
    count."""
    if jax.device_count() < 4:
        pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=4")
    mesh = Mesh(np.array(jax.devices()[:4]), ("data",))
    ids, lp, hs, ws = _inputs(16, n=16)
    mask = np.random.default_rng(16).random(16) < 0.7

    def loss(ids, lp, hs, ws, mask, count=None):
        out = fused_linear_topk_kl(
            ids, lp, hs, ws, tail="renormalize", reduction=reduction, mask=mask, count=count,
            chunk_size=2,
        )  # fmt: skip
        return jnp.sum(out) if reduction == "none" else out

    def sharded(ids, lp, hs, ws, mask):
        count = kldiv.count_kept(mask, axis_name="data") if reduction == "mean" else None
        return loss(ids, lp, hs, ws, mask, count)

    _assert_shard_map_equals_unsharded(mesh, loss, sharded, (ids, lp, hs, ws, mask))
