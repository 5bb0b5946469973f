"""Tests for kldiv.fused_linear.fused_linear_kl against materialised logits.

References materialise both logit tensors in float64 and compute each per-token value with an
independent formula (scipy log-softmax; the JSD from its definition through the mixture), then
reduce with numpy; gradients of the references come from ``jax.grad`` of a plain-jnp version of
the same formulas.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
from _grid import grid
from _jax_compat import enable_x64

import kldiv
from kldiv import fused_linear
from kldiv.fused_linear import fused_linear_kl

N, H_S, H_T, V = 11, 5, 7, 19


def _rng(seed=0):
    return np.random.default_rng(seed)


def _inputs(seed=0, n=N, v=V, vt=None):
    rng = _rng(seed)
    return (
        rng.normal(size=(n, H_S)),
        rng.normal(size=(H_S, v)),
        rng.normal(size=(n, H_T)),
        rng.normal(size=(H_T, v if vt is None else vt)),
    )


def _log_softmax(z):
    return z - jax.scipy.special.logsumexp(z, axis=-1, keepdims=True)


def _per_token(hs, ws, ht, wt, direction, t, beta, labels, hard_w, soft_w, t2):
    """Independent plain-jnp per-token values from materialised logits (float64)."""
    zs, zt = hs @ ws, jax.lax.stop_gradient(ht @ wt)
    lq, lp = _log_softmax(zs / t), _log_softmax(zt / t)
    p, q = jnp.exp(lp), jnp.exp(lq)
    if direction == "forward":
        soft = jnp.sum(p * (lp - lq), -1)
    elif direction == "reverse":
        soft = jnp.sum(q * (lq - lp), -1)
    else:
        lm = jnp.log(beta * p + (1 - beta) * q)
        soft = beta * jnp.sum(p * (lp - lm), -1) + (1 - beta) * jnp.sum(q * (lq - lm), -1)
    values = soft_w * (t * t if t2 else 1.0) * soft
    if labels is not None:
        ce = -jnp.take_along_axis(_log_softmax(zs), jnp.maximum(labels, 0)[:, None], -1)[:, 0]
        values = values + hard_w * ce
    return values


def _reduce_np(values, reduction, keep, dataset_size=None):
    kept = jnp.where(keep, values, 0.0)
    if reduction == "none":
        return kept
    total = jnp.sum(kept)
    if reduction == "sum":
        return total
    if reduction == "mean":
        return total / max(int(np.sum(keep)), 1)
    if reduction == "batchmean":
        return total / values.shape[0]
    return total * dataset_size / values.shape[0]


def _check(
    reduction,
    direction="forward",
    *,
    mask=None,
    labels=None,
    t=1.0,
    beta=0.5,
    seed=0,
    hard_weight=0.0,
    soft_weight=1.0,
    t2=False,
    chunk_size=4,
    dataset_size=None,
):
    hs, ws, ht, wt = _inputs(seed)
    keep = np.ones(N, bool) if mask is None else np.asarray(mask, bool)
    if labels is not None:
        keep = keep & (labels != -100)
    cot = np.arange(1.0, N + 1) if reduction == "none" else 1.0

    def ours(hs, ws):
        out = fused_linear_kl(
            ht,
            wt,
            hs,
            ws,
            reduction=reduction,
            mask=mask,
            temperature=t,
            direction=direction,
            beta=beta,
            labels=labels,
            hard_weight=hard_weight,
            soft_weight=soft_weight,
            scale_by_temperature_squared=t2,
            chunk_size=chunk_size,
            dataset_size=dataset_size,
        )
        return jnp.sum(out * cot), out

    def ref(hs, ws):
        v = _per_token(hs, ws, ht, wt, direction, t, beta, labels, hard_weight, soft_weight, t2)
        out = _reduce_np(v, reduction, keep, dataset_size)
        return jnp.sum(out * cot), out

    (_, got), g_got = jax.value_and_grad(ours, (0, 1), has_aux=True)(hs, ws)
    (_, want), g_want = jax.value_and_grad(ref, (0, 1), has_aux=True)(hs, ws)
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    for a, b in zip(g_got, g_want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("direction", ["forward", "reverse", "jsd"])
@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_matches_materialised_reference(direction, reduction):
    _check(reduction, direction, t=1.7, beta=0.3)


@pytest.mark.parametrize("reduction", ["none", "sum", "mean", "batchmean", "dataset"])
def test_every_reduction_with_mask(reduction):
    mask = _rng(1).random(N) > 0.4
    _check(reduction, "forward", mask=mask, dataset_size=1000 if reduction == "dataset" else None)


@pytest.mark.parametrize("chunk_size", [1, 3, 11, 50])
def test_chunk_sizes_not_dividing_n(chunk_size):
    _check("mean", "reverse", chunk_size=chunk_size, mask=_rng(2).random(N) > 0.3)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_hard_label_cross_entropy_in_the_same_pass(reduction):
    labels = _rng(3).integers(0, V, N)
    labels[[1, 6]] = -100
    _check(
        reduction,
        "forward",
        labels=labels,
        hard_weight=0.7,
        soft_weight=0.4,
        t=2.0,
        mask=_rng(4).random(N) > 0.2,
    )
    # hard term only: the mean token cross-entropy (scipy reference).
    hs, ws, ht, wt = _inputs()
    out = fused_linear_kl(
        ht, wt, hs, ws, reduction="mean", labels=labels, hard_weight=1.0, soft_weight=0.0
    )
    keep = labels != -100
    ce = -scipy.special.log_softmax(hs @ ws, -1)[np.arange(N), np.maximum(labels, 0)]
    np.testing.assert_allclose(out, ce[keep].mean(), rtol=1e-12)


def test_temperature_squared_scaling():
    _check("sum", "jsd", t=3.0, t2=True)
    hs, ws, ht, wt = _inputs()
    a = fused_linear_kl(ht, wt, hs, ws, reduction="sum", temperature=3.0)
    b = fused_linear_kl(
        ht, wt, hs, ws, reduction="sum", temperature=3.0, scale_by_temperature_squared=True
    )
    np.testing.assert_allclose(b, 9.0 * a, rtol=1e-12)
    # a traced temperature (annealing schedules) is accepted.
    f = jax.jit(lambda t: fused_linear_kl(ht, wt, hs, ws, reduction="sum", temperature=t))
    np.testing.assert_allclose(f(3.0), a, rtol=1e-12)


def test_weight_gradient_tiles(monkeypatch):
    """The weight gradient accumulated in tiles of 2 of its 5 rows (the last tile overlapping)."""
    monkeypatch.setattr(fused_linear, "WEIGHT_TILE_BYTES", 2 * V * 8)
    monkeypatch.setattr(fused_linear, "MIN_WEIGHT_TILE", 1)
    _check("mean", "forward", chunk_size=3, mask=_rng(5).random(N) > 0.3)
    _check("none", "jsd", chunk_size=5)


def test_labels_without_hard_term_only_drop_ignored_tokens():
    labels = _rng(9).integers(0, V, N)
    labels[[2, 3]] = -100
    hs, ws, ht, wt = _inputs(9)
    got = fused_linear_kl(ht, wt, hs, ws, reduction="mean", labels=labels, chunk_size=4)
    want = fused_linear_kl(ht, wt, hs, ws, reduction="mean", mask=labels != -100, chunk_size=4)
    np.testing.assert_allclose(got, want, rtol=1e-13)


def test_teacher_is_frozen_and_dropped_tokens_touch_nothing():
    hs, ws, ht, wt = _inputs(6)
    mask = np.ones(N, bool)
    mask[[0, 5]] = False
    hs_bad, ht_bad = hs.copy(), ht.copy()
    hs_bad[[0, 5]] = np.nan
    ht_bad[5] = np.inf

    def f(hs, ws, ht, wt):
        return fused_linear_kl(ht, wt, hs, ws, reduction="mean", mask=mask, chunk_size=3)

    val, grads = jax.value_and_grad(f, (0, 1, 2, 3))(hs_bad, ws, ht_bad, wt)
    val_ok, grads_ok = jax.value_and_grad(f, (0, 1, 2, 3))(hs, ws, ht, wt)
    np.testing.assert_allclose(val, val_ok, rtol=1e-13)
    np.testing.assert_allclose(grads[1], grads_ok[1], rtol=1e-12)
    gh = np.asarray(grads[0])
    assert np.all(gh[[0, 5]] == 0) and np.all(np.isfinite(gh))
    assert np.all(grads[2] == 0) and np.all(grads[3] == 0)  # teacher frozen


def test_vocabulary_size_mismatch():
    hs, ws, ht, wt = _inputs(7, v=V + 3, vt=V)
    with pytest.raises(ValueError, match=rf"{V + 3}.*{V}|{V}.*{V + 3}") as e:
        fused_linear_kl(ht, wt, hs, ws, reduction="sum")
    assert "vocab_size" in str(e.value)
    # Explicit: compare over the first V ids; the student's extra columns get zero gradient.
    f = lambda hs, ws: fused_linear_kl(ht, wt, hs, ws, reduction="sum", vocab_size=V)  # noqa: E731
    val, (gh, gw) = jax.value_and_grad(f, (0, 1))(hs, ws)
    ref = lambda hs, ws: jnp.sum(kldiv.kl_from_logits(ht @ wt, hs @ ws[:, :V], impl="xla"))  # noqa: E731
    val_ref, (gh_ref, gw_ref) = jax.value_and_grad(ref, (0, 1))(hs, ws)
    np.testing.assert_allclose(val, val_ref, rtol=1e-12)
    np.testing.assert_allclose(gh, gh_ref, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(gw, gw_ref, rtol=1e-10, atol=1e-13)
    assert np.all(gw[:, V:] == 0)
    for bad in (0, V + 1, 2.5):
        with pytest.raises(ValueError, match="vocab_size"):
            fused_linear_kl(ht, wt, hs, ws, reduction="sum", vocab_size=bad)


def test_low_precision_inputs_and_leading_shape():
    hs, ws, ht, wt = _inputs(8, n=12)
    cast = lambda x: jnp.asarray(x, jnp.bfloat16)  # noqa: E731
    hs3, ht3 = cast(hs).reshape(3, 4, H_S), cast(ht).reshape(3, 4, H_T)
    out = fused_linear_kl(ht3, cast(wt), hs3, cast(ws), reduction="none", chunk_size=5)
    assert out.shape == (3, 4) and out.dtype == jnp.float32
    f32 = lambda x: np.asarray(jnp.asarray(x, jnp.bfloat16), np.float64)  # noqa: E731
    ref = kldiv.kl_from_logits(f32(ht) @ f32(wt), f32(hs) @ f32(ws), impl="xla")
    np.testing.assert_allclose(out.reshape(-1), ref, rtol=1e-4, atol=1e-5)
    g = jax.grad(lambda w: fused_linear_kl(ht3, cast(wt), hs3, w, reduction="mean"))(cast(ws))
    assert g.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(g, np.float32)))


def test_errors():
    hs, ws, ht, wt = _inputs()
    with pytest.raises(ValueError, match="reduction"):
        fused_linear_kl(ht, wt, hs, ws, reduction="avg")
    with pytest.raises(ValueError, match="direction"):
        fused_linear_kl(ht, wt, hs, ws, reduction="sum", direction="backward")
    with pytest.raises(ValueError, match="beta"):
        fused_linear_kl(ht, wt, hs, ws, reduction="sum", direction="jsd", beta=1.5)
    with pytest.raises(ValueError, match=r"`student_hidden` \(11, 5\).*`student_weight` \(4, 19\)"):
        fused_linear_kl(ht, wt, hs, ws[:4], reduction="sum")
    with pytest.raises(ValueError, match="leading"):
        fused_linear_kl(ht[:5], wt, hs, ws, reduction="sum")
    with pytest.raises(ValueError, match="labels"):
        fused_linear_kl(ht, wt, hs, ws, reduction="sum", hard_weight=1.0)
    with pytest.raises(TypeError, match="integer"):
        fused_linear_kl(ht, wt, hs, ws, reduction="sum", labels=np.zeros(N), hard_weight=1.0)
    with pytest.raises(TypeError, match="floating"):
        fused_linear_kl(ht, wt, hs.astype(np.int32), ws, reduction="sum")
    with pytest.raises(ValueError, match="temperature"):
        fused_linear_kl(ht, wt, hs, ws, reduction="sum", temperature=0.0)
    f32 = [np.asarray(x, np.float32) for x in (ht, wt, hs, ws)]
    with pytest.raises(ValueError, match="temperature.*smallest normal float32"):
        fused_linear_kl(*f32, reduction="sum", temperature=1e-39)
    for bad in (0, -3, 2.7, "2", True, np.int32(4)[None]):
        with pytest.raises(ValueError, match="chunk_size"):
            fused_linear_kl(ht, wt, hs, ws, reduction="sum", chunk_size=bad)
    for name in ("soft_weight", "hard_weight"):
        labels = np.zeros(N, np.int32)
        with pytest.raises(ValueError, match=f"`{name}` must be a scalar"):
            fused_linear_kl(ht, wt, hs, ws, reduction="sum", labels=labels, **{name: np.ones(N)})
        with pytest.raises(TypeError, match=name):
            fused_linear_kl(ht, wt, hs, ws, reduction="sum", labels=labels, **{name: "1"})
    with pytest.raises(ValueError, match="mask"):
        fused_linear_kl(ht, wt, hs, ws, reduction="sum", mask=np.ones(N + 1, bool))
    with pytest.raises(ValueError, match="dataset_size"):
        fused_linear_kl(ht, wt, hs, ws, reduction="dataset")
    with pytest.raises(ValueError, match="kldiv: `axis_name`='vocab' names no mapped axis"):
        fused_linear_kl(ht, wt, hs, ws, reduction="sum", axis_name="vocab")


def _temp(f, n, h, v, chunk):
    s = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)  # noqa: E731
    args = (s(n, h), s(h, v), s(n, h), s(h, v))
    grad = jax.jit(jax.value_and_grad(lambda *x: f(*x, chunk), (0, 1)))
    return grad.lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_temporary_memory_is_small_and_flat_in_n():
    def fused(hs, ws, ht, wt, chunk):
        return fused_linear_kl(ht, wt, hs, ws, reduction="mean", chunk_size=chunk)

    def materialised(hs, ws, ht, wt, chunk):
        del chunk
        zs, zt = hs @ ws, jax.lax.stop_gradient(ht @ wt)
        return kldiv.reduce(kldiv.kl_from_logits(zt, zs), "mean")

    h, v = 64, 4096
    ours = _temp(fused, 512, h, v, 32)
    peer = _temp(materialised, 512, h, v, None)
    assert ours <= 0.15 * peer, (ours, peer)
    # 4× the tokens: O(N·H) residuals (the hidden-state gradient) only, no O(N·V) growth.
    ours_4n = _temp(fused, 2048, h, v, 32)
    assert ours_4n - ours <= 2 * 4 * h * (2048 - 512), (ours, ours_4n)
    assert _temp(materialised, 2048, h, v, None) >= 2.5 * peer  # grows with N·V


def test_chunk_and_tile_sizes_per_backend():
    """On GPU and TPU: chunks of at least 1024 tokens and one weight-gradient product over all
    of H per chunk; on CPU the measured cache-sized defaults."""
    cpu, gpu = fused_linear._tuning("cpu"), fused_linear._tuning("cuda")
    assert cpu.min_chunk == fused_linear.MIN_CHUNK and cpu.weight_tile_bytes is not None
    assert gpu.min_chunk >= 1024 and gpu.weight_tile_bytes is None
    assert fused_linear._tuning("tpu").weight_tile_bytes is None


@pytest.mark.parametrize(
    *grid({"direction": ["forward", "reverse", "jsd"], "reduction": ["mean", "none"]})
)  # each direction and reduction; the full grid under -m slow
def test_gradients_of_temperature_and_term_weights(direction, reduction):
    """A traced temperature, soft_weight and hard_weight get their true gradients (they were
    silently 0): equal to autodiff of the materialised loss."""
    hs, ws, ht, wt = _inputs(12)
    labels = _rng(12).integers(0, V, N)
    w = jnp.arange(1.0, N + 1)

    def fused(t, sw, hw):
        out = fused_linear_kl(
            ht, wt, hs, ws, reduction=reduction, temperature=t, soft_weight=sw, hard_weight=hw,
            labels=labels, direction=direction, scale_by_temperature_squared=True, chunk_size=3,
        )  # fmt: skip
        return jnp.sum(out * w) if reduction == "none" else out

    def materialised(t, sw, hw):
        zt, zs = ht @ wt, hs @ ws
        if direction == "forward":
            d = kldiv.kl_from_logits(zt, zs, temperature=t, impl="xla")
        elif direction == "reverse":
            d = kldiv.kl_from_logits(zs, zt, temperature=t, impl="xla")
        else:
            d = kldiv.js_from_logits(zt, zs, temperature=t)
        ce = -jnp.take_along_axis(jax.nn.log_softmax(zs), labels[:, None], -1)[:, 0]
        v = sw * t * t * d + hw * ce
        return jnp.sum(v * w) if reduction == "none" else jnp.mean(v)

    args = (jnp.float64(2.5), jnp.float64(0.7), jnp.float64(0.3))
    np.testing.assert_allclose(fused(*args), materialised(*args), rtol=1e-12)
    got = jax.grad(fused, (0, 1, 2))(*args)
    want = jax.grad(materialised, (0, 1, 2))(*args)
    np.testing.assert_allclose(got, want, rtol=1e-9)


def test_out_of_range_labels():
    hs, ws, ht, wt = _inputs(13)
    labels = np.arange(N) % V
    labels[2] = V  # beyond the vocabulary
    with pytest.raises(ValueError, match="labels"):
        fused_linear_kl(ht, wt, hs, ws, reduction="mean", labels=labels, hard_weight=1.0)
    # Under jit the token is dropped, exactly like ignore_index.
    f = jax.jit(
        lambda y: fused_linear_kl(ht, wt, hs, ws, reduction="mean", labels=y, hard_weight=1.0)
    )
    dropped = np.where(np.arange(N) == 2, -100, labels)
    np.testing.assert_allclose(f(labels), f(dropped), rtol=1e-12)


@pytest.mark.parametrize(
    "dtype, v",
    [(np.uint8, 256), (np.int8, 128), (np.uint16, 65536), (np.int16, 32768), (np.uint32, 300)],
)
def test_narrow_and_unsigned_labels_equal_int32_labels(dtype, v):
    """The vocabulary bound and ignore_index are compared in a dtype that holds them: in the
    labels' own dtype V = 256 (uint8), 128 (int8), 65536 (uint16), 32768 (int16) wraps, which
    put every label out of range, and −100 is 156 as a uint8 (a valid id taken for ignored)."""
    rng = _rng(21)
    n, h = 6, 3
    hs, ht = rng.normal(size=(n, h)), rng.normal(size=(n, h))
    ws, wt = 0.1 * rng.normal(size=(h, v)), 0.1 * rng.normal(size=(h, v))
    top = np.iinfo(dtype).max if v > np.iinfo(dtype).max else v - 1
    labels = np.array([0, 1, 156 % v, v // 2, top, v - 1]).astype(dtype)

    def loss(y, reduction="mean"):
        return lambda hs_: fused_linear_kl(
            ht, wt, hs_, ws, reduction=reduction, labels=y, hard_weight=1.0, chunk_size=4
        )

    wide = labels.astype(np.int32)
    want, want_g = jax.value_and_grad(loss(wide))(hs)
    for f in (loss(labels), jax.jit(loss(labels))):  # eager (validated) and traced
        got, got_g = jax.value_and_grad(f)(hs)
        np.testing.assert_allclose(got, want, rtol=1e-6)
        np.testing.assert_allclose(got_g, want_g, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(loss(labels, "none")(hs), loss(wide, "none")(hs), rtol=1e-6)


@pytest.mark.parametrize("h_dtype, w_dtype", [("bfloat16", "float32"), ("float32", "bfloat16")])
def test_mixed_precision_heads_differentiate_like_the_materialised_product(h_dtype, w_dtype):
    """With one head operand in bfloat16 and the other in float32, the gradient products take
    the float32 cotangent unrounded, as autodiff through ``h @ w`` (promoted to float32) does:
    the float32 gradient keeps float32 accuracy, not bfloat16's."""
    rng = _rng(22)
    n, h, v = 16, 32, 64
    ht, wt, hs, ws = (rng.normal(size=s) for s in ((n, h), (h, v), (n, h), (h, v)))
    hs, ht = jnp.asarray(hs, h_dtype), jnp.asarray(ht, h_dtype)
    ws, wt = jnp.asarray(ws, w_dtype), jnp.asarray(wt, w_dtype)

    def fused(hs_, ws_):
        return fused_linear_kl(ht, wt, hs_, ws_, reduction="mean", temperature=2.0, chunk_size=5)

    def materialised(hs_, ws_):
        return jnp.mean(kldiv.kl_from_logits(ht @ wt, hs_ @ ws_, temperature=2.0, impl="xla"))

    got = jax.grad(fused, argnums=(0, 1))(hs, ws)
    want = jax.grad(materialised, argnums=(0, 1))(hs, ws)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype
        if g.dtype == jnp.float32:  # the operand kept in float32: float32 accuracy
            scale = float(jnp.max(jnp.abs(w)))
            np.testing.assert_allclose(g, w, rtol=0, atol=2e-6 * scale)


def test_non_finite_total_keeps_every_token_gradient():
    """The reduced value is that of the reduction, its gradient that of the fused pass: a total
    at +inf (a token's KL overflows, the others' sum too) or NaN (one token's hidden state) must
    not zero the gradients, which autodiff through the materialised logits gives finite."""
    rng = _rng(23)
    n, h, v = 3, 5, 4
    hs = (rng.normal(size=(n, h)) * 1e18).astype(np.float32)
    ws = (rng.normal(size=(h, v)) * 1e19).astype(np.float32)
    t = 0.2  # per-token KL ≈ 2e38 against the opposite head: the sum overflows

    def fused(hs_, ws_):
        return fused_linear_kl(hs, -ws, hs_, ws_, reduction="sum", temperature=t)

    def materialised(hs_, ws_):
        return jnp.sum(kldiv.kl_from_logits(hs @ -ws, hs_ @ ws_, temperature=t, impl="xla"))

    values = fused_linear_kl(hs, -ws, hs, ws, reduction="none", temperature=t)
    assert not np.isfinite(np.sum(values, dtype=np.float32)) and np.sum(np.isfinite(values)) >= 2
    (v_f, g_f), (v_m, g_m) = (
        jax.value_and_grad(f, argnums=(0, 1))(hs, ws) for f in (fused, materialised)
    )
    assert v_f == v_m == np.inf
    for a, b in zip(g_f, g_m, strict=True):
        assert np.all(np.isfinite(a)) and float(jnp.max(jnp.abs(a))) > 0
        np.testing.assert_allclose(a, b, rtol=1e-5)

    # a NaN in one token's hidden state: NaN value, the other tokens' gradients as autodiff's
    ht2, wt2, hs2, ws2 = (rng.normal(size=s).astype(np.float32) for s in ((n, h), (h, v)) * 2)
    hs2[2, 0] = np.nan
    got = jax.grad(lambda x: fused_linear_kl(ht2, wt2, x, ws2, reduction="mean"))(hs2)
    want = jax.grad(lambda x: jnp.mean(kldiv.kl_from_logits(ht2 @ wt2, x @ ws2, impl="xla")))(hs2)
    np.testing.assert_allclose(got[:2], want[:2], rtol=1e-5, atol=1e-7)
    assert np.all(np.isfinite(got[:2])) and np.all(np.isnan(got[2]))


# ---------------------------------------------------------------------------------------------
# grad_filter: the backward products of [chunk × vocabulary-tile] blocks whose per-token
# student-logit gradients are all ≤ τ are skipped. Tiles of 4 columns here (V = 19: the last
# tile overlaps the one before it).


def _peaked_inputs(seed=10, n=N, v=V):
    """Hidden states with a constant coordinate whose weight row is a Zipf-like bias −3·ln(1+v):
    the high columns are many nats below the top ones for every token, as a sorted real
    vocabulary's tail is."""
    hs, ws, ht, wt = _inputs(seed, n=n, v=v)
    hs[:, 0] = ht[:, 0] = 1.0
    bias = -3.0 * np.log1p(np.arange(v))
    ws[0] = bias + 0.1 * ws[0]
    wt[0] = bias
    return hs, ws, ht, wt


def _filtered(reduction, grad_filter, *, inputs=None, chunk_size=4, **kw):
    hs, ws, ht, wt = _peaked_inputs() if inputs is None else inputs
    cot = np.arange(1.0, N + 1) if reduction == "none" else 1.0

    def f(hs, ws):
        out = fused_linear_kl(
            ht,
            wt,
            hs,
            ws,
            reduction=reduction,
            chunk_size=chunk_size,
            grad_filter=grad_filter,
            **kw,
        )
        return jnp.sum(out * cot), out

    (_, value), grads = jax.value_and_grad(f, (0, 1), has_aux=True)(hs, ws)
    return value, grads


@pytest.fixture
def small_filter_tiles(monkeypatch):
    monkeypatch.setattr(fused_linear, "GRAD_FILTER_TILE", 4)


# Soft-capped and scaled heads: per chunk, the same as materialising c·tanh(s·z/c) first.


def _cap(z, softcap, logit_scale):
    s = 1.0 if logit_scale is None else logit_scale
    return s * z if softcap is None else softcap * jnp.tanh(s * z / softcap)


@pytest.mark.parametrize(
    *grid({"direction": ["forward", "reverse", "jsd"], "reduction": ["mean", "none"]})
)  # each direction and reduction; the full grid under -m slow
def test_grad_filter_zero_is_the_exact_gradient(small_filter_tiles, direction, reduction):
    labels = _rng(11).integers(0, V, N)
    labels[3] = -100
    kw = dict(
        direction=direction,
        temperature=1.7,
        mask=_rng(12).random(N) > 0.2,
        labels=labels,
        hard_weight=0.3,
    )
    want_v, want_g = _filtered(reduction, None, **kw)
    got_v, got_g = _filtered(reduction, 0.0, **kw)
    np.testing.assert_allclose(got_v, want_v, rtol=1e-14)
    for a, b in zip(got_g, want_g, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-15)
    # ... and the float64 materialised reference.
    _check(reduction, direction, t=1.7, labels=labels, hard_weight=0.3)


def _per_token_logit_grads(hs, ws, ht, wt, t=1.0):
    """g_iv = ∂ℓ_i/∂z_s,iv (forward KL), materialised in float64."""
    zs, zt = hs @ ws, ht @ wt
    return jax.nn.softmax(zs / t) / t - jax.nn.softmax(zt / t) / t


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("tau", [1e-4, 0.05])
def test_grad_filter_error_within_the_documented_bound(small_filter_tiles, reduction, tau):
    inputs = _peaked_inputs()
    hs, ws, ht, wt = inputs
    mask = np.ones(N, bool)
    mask[[2, 7]] = False
    want_v, (gh, gw) = _filtered(reduction, None, inputs=inputs, temperature=1.3, mask=mask)
    got_v, (gh_f, gw_f) = _filtered(reduction, tau, inputs=inputs, temperature=1.3, mask=mask)
    np.testing.assert_allclose(got_v, want_v, rtol=1e-14)  # the value is never filtered
    # c_i: the cotangent of token i's value.
    c = np.where(mask, np.arange(1.0, N + 1) if reduction == "none" else 1.0, 0.0)
    c = c / mask.sum() if reduction == "mean" else c
    # Dropped entries have |g_iv| ≤ τ: |Δgh[i, h]| ≤ τ·|c_i|·‖W[h, :]‖₁ and
    # |Δgw[h, v]| ≤ τ·Σ_i |c_i|·|x[i, h]|, up to rounding.
    bound_h = tau * np.abs(c)[:, None] * np.abs(ws).sum(1)[None, :]
    bound_w = tau * (np.abs(c)[:, None] * np.abs(hs)).sum(0)[:, None]
    assert np.all(np.abs(gh_f - gh) <= bound_h + 1e-14)
    assert np.all(np.abs(gw_f - gw) <= bound_w + 1e-14)
    # The last tile's own columns (16–18) are below τ for every kept token at τ = 0.05: never
    # computed, their weight gradient is exactly 0 (the exact one is not).
    g = np.abs(_per_token_logit_grads(hs, ws, ht, wt, 1.3))[mask]
    if tau >= 0.05:
        assert np.all(g[:, 16:] <= tau) and np.all(gw[:, 16:] != 0)
    if np.all(g[:, 16:] <= tau):
        assert np.all(gw_f[:, 16:] == 0)
    np.testing.assert_allclose(gw_f[:, :4], gw[:, :4], rtol=1e-12)  # the head is kept


def test_grad_filter_drops_only_whole_tiles_below_the_threshold(small_filter_tiles):
    """With τ above every |g_iv| the backward products vanish, one tile below it and nothing
    else: the gradient equals the exact one with those columns of the logit gradient zeroed."""
    inputs = _peaked_inputs()
    hs, ws, ht, wt = inputs
    _, (gh, gw) = _filtered("sum", 10.0, inputs=inputs, chunk_size=N)
    assert np.all(gh == 0) and np.all(gw == 0)
    g = _per_token_logit_grads(hs, ws, ht, wt)
    tiles = [np.abs(g[:, i : i + 4]).max() for i in range(0, V, 4)]
    tau = float(np.sort(tiles)[0]) * 1.0001  # exactly the quietest tile drops
    dead = int(np.argmin(tiles))
    _, (gh_f, gw_f) = _filtered("sum", tau, inputs=inputs, chunk_size=N)
    g_kept = np.array(g)
    g_kept[:, 4 * dead : 4 * dead + 4] = 0
    np.testing.assert_allclose(gh_f, g_kept @ ws.T, rtol=1e-10, atol=1e-15)
    np.testing.assert_allclose(gw_f, hs.T @ g_kept, rtol=1e-10, atol=1e-15)


def test_grad_filter_default_tiles_jit_and_edge_inputs():
    """Default tile width (wider than V here), under jit; masked NaN hidden states and huge
    logits stay finite; float32 with τ = eps(float32) and a sorted peaked vocabulary."""
    from _jax_compat import enable_x64

    hs, ws, ht, wt = _peaked_inputs(v=3000, n=40)
    hs_bad = hs.copy()
    hs_bad[5] = np.nan
    mask = np.ones(40, bool)
    mask[5] = False

    def f(hs, ws, gf, scale):
        return fused_linear_kl(
            ht * scale, wt, hs * scale, ws, reduction="mean", mask=mask, grad_filter=gf
        )

    grad = jax.jit(jax.value_and_grad(f, (0, 1)), static_argnums=(2,))
    for scale in (1.0, 1e4):
        v0, g0 = grad(hs_bad, ws, None, scale)
        v1, g1 = grad(hs_bad, ws, 1e-6, scale)
        np.testing.assert_allclose(v1, v0, rtol=1e-14)
        assert np.isfinite(v1)
        assert all(np.all(np.isfinite(x)) for x in g1)
    with enable_x64(False):
        hs32, ws32, ht32, wt32 = (jnp.asarray(x, jnp.float32) for x in (hs, ws, ht, wt))

        def f32(hs, ws, gf):
            return fused_linear_kl(ht32, wt32, hs, ws, reduction="mean", grad_filter=gf)

        grad32 = jax.jit(jax.value_and_grad(f32, (0, 1)), static_argnums=(2,))
        eps = float(jnp.finfo(jnp.float32).eps)
        v0, (gh0, gw0) = grad32(hs32, ws32, None)
        v1, (gh1, gw1) = grad32(hs32, ws32, eps)
        assert v0.dtype == jnp.float32
        np.testing.assert_allclose(v1, v0, rtol=1e-6)
        np.testing.assert_allclose(gh1, gh0, rtol=0, atol=float(np.abs(gh0).max()) * 1e-5)
        np.testing.assert_allclose(gw1, gw0, rtol=0, atol=float(np.abs(gw0).max()) * 1e-5)


def test_grad_filter_sorted_vocabulary_recipe(small_filter_tiles):
    """A permutation applied to both weights' columns (and to the labels) leaves the value
    unchanged and permutes the weight gradient."""
    hs, ws, ht, wt = _peaked_inputs()
    perm = _rng(13).permutation(V)
    inv = np.argsort(perm)
    labels = _rng(14).integers(0, V, N)

    def f(ws, wt, labels, gf):
        return fused_linear_kl(
            ht, wt, hs, ws, reduction="mean", labels=labels, hard_weight=0.5, grad_filter=gf
        )

    v0, g0 = jax.value_and_grad(f)(ws, wt, labels, None)
    v1, g1 = jax.value_and_grad(f)(ws[:, perm], wt[:, perm], inv[labels], 0.0)
    np.testing.assert_allclose(v1, v0, rtol=1e-13)
    np.testing.assert_allclose(g1, g0[:, perm], rtol=1e-11, atol=1e-15)


def test_grad_filter_errors():
    hs, ws, ht, wt = _inputs()
    for bad in (True, "1e-7", jnp.asarray(1e-7)):
        with pytest.raises(TypeError, match="grad_filter"):
            fused_linear_kl(ht, wt, hs, ws, reduction="sum", grad_filter=bad)
    for bad in (-1e-7, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="grad_filter"):
            fused_linear_kl(ht, wt, hs, ws, reduction="sum", grad_filter=bad)


# The exact per-token RL penalty KL(π_θ‖π_ref) from hidden states (fused_linear_kl_penalty).


def _penalty_reference(policy_hidden, policy_weight, ref_hidden, ref_weight, keep):
    """KL(π_θ‖π_ref) per token from materialised float64 log-softmax, masked tokens 0."""
    lp = _log_softmax(policy_hidden @ policy_weight)
    lr = _log_softmax(jax.lax.stop_gradient(ref_hidden @ ref_weight))
    return jnp.where(keep, jnp.sum(jnp.exp(lp) * (lp - lr), -1), 0.0)


@pytest.mark.parametrize("chunk", [3, None])
def test_penalty_equals_exact_per_token_kl_from_log_softmax(chunk):
    hs, ws, ht, wt = _inputs(12)
    keep = _rng(13).random(N) < 0.7
    hs[~keep] = np.nan  # padding: whatever it holds never counts
    weights = _rng(14).normal(size=N)  # e.g. per-token advantages multiplying the penalty

    def fused(hs, ws):
        out = kldiv.fused_linear_kl_penalty(
            ht, wt, hs, ws, reduction="none", mask=keep, chunk_size=chunk
        )
        return jnp.sum(out * weights), out

    def reference(hs, ws):
        out = _penalty_reference(jnp.where(keep[:, None], hs, 0), ws, ht, wt, keep)
        return jnp.sum(out * weights), out

    (got, got_vals), got_g = jax.value_and_grad(fused, (0, 1), has_aux=True)(hs, ws)
    (want, want_vals), want_g = jax.value_and_grad(reference, (0, 1), has_aux=True)(hs, ws)
    np.testing.assert_allclose(got_vals, want_vals, rtol=1e-12, atol=1e-14)
    assert np.all(got_vals[~keep] == 0) and np.all(got_vals >= 0)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    for g, w in zip(got_g, want_g, strict=True):
        assert np.all(np.isfinite(g))
        np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-13)
    assert np.all(got_g[0][~keep] == 0)
    # The same values as the estimators' exact penalty on materialised logits (policy first).
    exact = kldiv.kl_penalty_exact(np.where(keep[:, None], hs, 0) @ ws, ht @ wt, mask=keep)
    np.testing.assert_allclose(got_vals, exact, rtol=1e-12, atol=1e-14)


def test_penalty_is_reverse_kl_and_reduces_like_fused_linear_kl():
    hs, ws, ht, wt = _inputs(15)
    mask = np.arange(N) % 4 != 0
    got = kldiv.fused_linear_kl_penalty(ht, wt, hs, ws, reduction="mean", mask=mask)
    want = fused_linear_kl(ht, wt, hs, ws, reduction="mean", mask=mask, direction="reverse")
    np.testing.assert_allclose(got, want, rtol=1e-14)
    ref = _penalty_reference(hs, ws, ht, wt, mask)
    np.testing.assert_allclose(got, np.sum(ref) / mask.sum(), rtol=1e-12)


def test_penalty_float32_accurate_near_the_reference_policy():
    """At the start of RL training π_θ ≈ π_ref: float32 keeps the tiny KL accurate (relative)."""

    hs, ws, ht, wt = _inputs(16, n=8, v=64)
    ht, wt = hs, ws
    hs = hs + 1e-3 * _rng(17).normal(size=hs.shape)
    want = _penalty_reference(hs, ws, ht, wt, np.ones(8, bool))
    with enable_x64(False):
        args = [np.asarray(x, np.float32) for x in (ht, wt, hs, ws)]
        got = kldiv.fused_linear_kl_penalty(*args, reduction="none")
        assert got.dtype == jnp.float32
    assert np.all(np.asarray(want) > 0)
    np.testing.assert_allclose(got, want, rtol=2e-3)


@pytest.mark.parametrize(
    *grid(
        {
            "direction": ["forward", "reverse", "jsd"],
            "reduction": ["mean", "none"],
            "softcap,logit_scale,temperature": [
                (2.0, None, 1.0),
                (3.0, 0.5, 2.0),
                ((None, 2.5), (1.5, None), "traced"),
            ],
        },
        cover=[("direction", "softcap,logit_scale,temperature")],  # all under -m slow
    )
)
def test_softcap_matches_materialised_logits(
    direction, reduction, softcap, logit_scale, temperature
):
    hs, ws, ht, wt = _inputs(seed=7)
    hs, ws, ht, wt = (3 * x for x in (hs, ws, ht, wt))  # logits well past the caps
    labels = _rng(8).integers(0, V, N)
    labels[3] = -100
    caps = softcap if isinstance(softcap, tuple) else (softcap, softcap)
    scales = logit_scale if isinstance(logit_scale, tuple) else (logit_scale, logit_scale)
    t = jnp.asarray(1.7) if temperature == "traced" else temperature
    kw = dict(reduction=reduction, direction=direction, labels=labels, hard_weight=0.3)

    def fused(hs, ws, t):
        v = fused_linear_kl(
            ht,
            wt,
            hs,
            ws,
            temperature=t,
            softcap=softcap,
            logit_scale=logit_scale,
            chunk_size=4,
            **kw,
        )
        return jnp.sum(v * (1.0 + jnp.arange(v.size).reshape(v.shape))), v

    def materialised(hs, ws, t):
        zt, zs = _cap(ht @ wt, caps[0], scales[0]), _cap(hs @ ws, caps[1], scales[1])
        if direction == "forward":
            d = kldiv.kl_from_logits(zt, zs, temperature=t)
        elif direction == "reverse":
            d = kldiv.kl_from_logits(zs, zt, temperature=t)
        else:
            d = kldiv.js_from_logits(zt, zs, temperature=t)
        ce = -jnp.take_along_axis(_log_softmax(zs), jnp.maximum(labels, 0)[:, None], -1)[:, 0]
        keep = labels != -100
        v = jnp.where(keep, d + 0.3 * ce, 0.0)
        v = jnp.sum(v) / jnp.sum(keep) if reduction == "mean" else v
        return jnp.sum(v * (1.0 + jnp.arange(v.size).reshape(v.shape))), v

    (_, v), g = jax.value_and_grad(fused, (0, 1, 2), has_aux=True)(hs, ws, t)
    (_, rv), rg = jax.value_and_grad(materialised, (0, 1, 2), has_aux=True)(hs, ws, t)
    np.testing.assert_allclose(v, rv, rtol=1e-10, atol=1e-12)
    for gi, ri in zip(g, rg, strict=True):
        np.testing.assert_allclose(gi, ri, rtol=1e-8, atol=1e-11)


def test_softcap_huge_logits_float32_finite():
    """Logits near ±3e38 from the matmul, capped and/or scaled: never NaN, finite gradients, and
    finite values with a cap (without one the divergence itself may exceed float32)."""
    from _jax_compat import enable_x64

    hs, ws, ht, wt = _inputs(seed=9)
    with enable_x64(False):
        args = [jnp.asarray(x, jnp.float32) for x in (ht, 1e37 * wt, hs, 1e37 * ws)]

        def f(hs_, ws_, **kw):
            return fused_linear_kl(args[0], args[1], hs_, ws_, reduction="mean", **kw)

        for kw in (dict(softcap=30.0), dict(softcap=30.0, logit_scale=4.0), dict(logit_scale=8.0)):
            v, g = jax.value_and_grad(lambda a, b, kw=kw: f(a, b, **kw), (0, 1))(*args[2:])
            assert not np.isnan(float(v)) and float(v) >= 0, kw
            if "softcap" in kw:  # capped logits: an ordinary, finite divergence
                assert np.isfinite(float(v)), kw
            assert all(np.all(np.isfinite(np.asarray(gi))) for gi in g), kw
