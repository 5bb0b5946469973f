"""Multi-device tests: run with 4 host devices in their own pytest invocation.

``make test`` runs them as
``XLA_FLAGS=--xla_force_host_platform_device_count=4 pytest -m multidevice tests``
so that the rest of the suite keeps a single device.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import kldiv

pytestmark = pytest.mark.multidevice


@pytest.fixture(scope="module")
def mesh():
    if jax.device_count() < 4:
        pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=4")
    return Mesh(np.array(jax.devices()[:4]), ("data",))


def _data(seed=0):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(8, 6, 16))  # 8 sequences × 6 tokens × vocab 16
    b = rng.normal(size=(8, 6, 16))
    # each device's shard keeps a different number of tokens
    keep = np.zeros((8, 6), bool)
    keep[0:2, :] = True
    keep[2:4, :1] = True
    keep[4:6, :3] = True
    keep[6:8, 5] = True
    return a, b, keep


@pytest.mark.parametrize("reduction", ["mean", "batchmean", "sum", "dataset"])
def test_reduce_under_shard_map_uses_global_counts(mesh, reduction):
    a, b, keep = _data()
    extra = {"dataset_size": 1000} if reduction == "dataset" else {}

    def loss(x, y, m, axis_name=None):
        vals = kldiv.kl_from_logits(x, y)
        return kldiv.reduce(vals, reduction, mask=m, axis_name=axis_name, **extra)

    want, want_g = jax.value_and_grad(loss, argnums=1)(a, b, keep)

    def sharded(x, y, m):
        def step(x, y, m):
            val, g = jax.value_and_grad(loss, argnums=1)(x, y, m, axis_name="data")
            return val, g

        return jax.shard_map(
            step,
            mesh=mesh,
            in_specs=(P("data"), P("data"), P("data")),
            out_specs=(P(), P("data")),
        )(x, y, m)

    got, got_g = jax.jit(sharded)(a, b, keep)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    np.testing.assert_allclose(got_g, want_g, rtol=1e-12, atol=1e-15)
    if reduction == "mean":
        # the average of per-device means is a different (wrong) number here
        per_dev = [loss(a[i : i + 2], b[i : i + 2], keep[i : i + 2]) for i in range(0, 8, 2)]
        assert not np.isclose(np.mean(per_dev), want)


def test_named_sharding_jit_matches_single_device(mesh):
    a, b, keep = _data(1)
    sharding = NamedSharding(mesh, P("data"))
    a_s, b_s, k_s = (jax.device_put(x, sharding) for x in (a, b, keep))
    f = jax.jit(lambda x, y, m: kldiv.reduce(kldiv.kl_from_logits(x, y), "mean", mask=m))
    np.testing.assert_allclose(f(a_s, b_s, k_s), f(a, b, keep), rtol=1e-12)


@pytest.mark.parametrize(
    "transform",
    [{}, dict(softcap=4.0, logit_scale=(2.0, 0.5))],
    ids=["plain", "softcap"],
)
def test_tensor_parallel_vocabulary(mesh, transform):
    """Logits split over the vocabulary (model axis): values and gradients equal unsharded
    (also soft-capped and scaled: the row maxima are transformed after the pmax)."""
    rng = np.random.default_rng(2)
    a = rng.normal(size=(5, 32)) * 3
    b = rng.normal(size=(5, 32)) * 3
    a[:, 3] = b[:, 3] = -np.inf  # a masked entry in one shard
    a[1, 8:16] = -np.inf  # a whole shard of p empty for one row
    mesh_tp = Mesh(np.array(jax.devices()[:4]), ("model",))

    def loss(x, y, axis_name=None):
        vals = kldiv.kl_from_logits(x, y, temperature=1.5, axis_name=axis_name, **transform)
        return jnp.sum(vals * jnp.arange(1.0, 6.0)), vals

    (want, want_vals), want_g = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(a, b)

    def step(x, y):
        (val, vals), g = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
            x, y, axis_name="model"
        )
        return val, vals, g

    got, got_vals, got_g = jax.jit(
        jax.shard_map(
            step,
            mesh=mesh_tp,
            in_specs=(P(None, "model"), P(None, "model")),
            out_specs=(P(), P(), (P(None, "model"), P(None, "model"))),
        )
    )(a, b)
    np.testing.assert_allclose(got_vals, want_vals, rtol=1e-12)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    for g, w in zip(got_g, want_g, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-14)


def _unsharded_and_sharded(mesh, loss, args, in_specs, argnums):
    """(value, grads) of ``loss`` on whole arrays and inside ``shard_map`` with its default
    ``check_vma=True`` (the per-shard losses psum'd), for comparison."""
    want = jax.value_and_grad(loss, argnums)(*args)

    def step(*xs):
        val, g = jax.value_and_grad(lambda *ys: jax.lax.psum(loss(*ys), "data"), argnums)(*xs)
        return val, g

    out_specs = (P(), tuple(in_specs[i] for i in argnums))
    got = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=in_specs, out_specs=out_specs))(*args)
    return want, got


@pytest.mark.parametrize("argnums", [(0, 1), (1,)], ids=["both", "student"])
@pytest.mark.parametrize("impl", ["xla", "chunked", "pallas", "auto"])
@pytest.mark.parametrize("prior", ["replicated", "sharded"])
def test_every_impl_under_shard_map_with_replicated_and_sharded_inputs(mesh, impl, prior, argnums):
    """Data parallel: the teacher sharded over examples, the model a replicated [V] prior (its
    gradient is the sum over shards) or sharded like the teacher; the default check_vma=True.
    Both gradients, or the model's alone (a frozen teacher: the chunked path forms it in the
    forward pass)."""
    rng = np.random.default_rng(5)
    a = rng.normal(size=(8, 16)) * 2
    b = rng.normal(size=(16,)) if prior == "replicated" else rng.normal(size=(8, 16))
    where = np.ones((8, 16), bool)
    where[:, 3] = False

    def loss(x, y, w):
        return jnp.sum(kldiv.kl_from_logits(x, y, where=w, temperature=2.0, impl=impl))

    b_spec = P() if prior == "replicated" else P("data")
    (want, want_g), (got, got_g) = _unsharded_and_sharded(
        mesh, loss, (a, b, where), (P("data"), b_spec, P("data")), argnums
    )
    np.testing.assert_allclose(got, want, rtol=1e-12)
    for g, w in zip(got_g, want_g, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("impl", ["xla", "chunked", "pallas", "auto"])
def test_softcap_under_shard_map_with_a_replicated_prior(mesh, impl):
    """Data parallel with soft-capped and scaled logits: a replicated model prior gets the sum
    of the shards' gradients."""
    rng = np.random.default_rng(6)
    a = rng.normal(size=(8, 16)) * 20
    b = rng.normal(size=(16,)) * 20
    where = np.ones((8, 16), bool)
    where[:, 3] = False

    def loss(x, y, w):
        v = kldiv.kl_from_logits(
            x, y, where=w, temperature=2.0, impl=impl, softcap=(10.0, 5.0), logit_scale=0.7
        )
        return jnp.sum(v)

    (want, want_g), (got, got_g) = _unsharded_and_sharded(
        mesh, loss, (a, b, where), (P("data"), P(), P("data")), (0, 1)
    )
    np.testing.assert_allclose(got, want, rtol=1e-12)
    for g, w in zip(got_g, want_g, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_fused_linear_kl_under_shard_map_with_replicated_weights(mesh, reduction):
    """The common data-parallel case: hidden states sharded over tokens, both LM heads
    replicated; gradients w.r.t. the replicated student weight are summed over shards."""
    rng = np.random.default_rng(6)
    n, h, v = 16, 5, 12
    ht, hs = rng.normal(size=(n, h)), rng.normal(size=(n, h))
    wt, ws = rng.normal(size=(h, v)), rng.normal(size=(h, v))

    def loss(ht, wt, hs, ws):
        out = kldiv.fused_linear_kl(ht, wt, hs, ws, reduction=reduction, temperature=1.5)
        return jnp.sum(out) if reduction == "none" else out

    specs = (P("data"), P(), P("data"), P())
    (want, want_g), (got, got_g) = _unsharded_and_sharded(
        mesh, loss, (ht, wt, hs, ws), specs, (2, 3)
    )
    np.testing.assert_allclose(got, want, rtol=1e-12)
    for g, w in zip(got_g, want_g, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("grad_filter", [None, 0.0])
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_fused_linear_kl_grad_filter_under_shard_map(mesh, reduction, grad_filter):
    """Several chunks per shard (the loop carries vary over the mesh axis, also for the
    forward-only pass of reduction="none"), and grad_filter's loop over live vocabulary tiles
    (a data-dependent trip count per shard): τ = 0 gives the exact gradient."""
    rng = np.random.default_rng(7)
    n, h, v = 16, 5, 12
    ht, hs = rng.normal(size=(n, h)), rng.normal(size=(n, h))
    wt, ws = rng.normal(size=(h, v)), rng.normal(size=(h, v))

    def loss(ht, wt, hs, ws, gf=grad_filter):
        out = kldiv.fused_linear_kl(
            ht, wt, hs, ws, reduction=reduction, chunk_size=3, grad_filter=gf
        )
        return jnp.sum(out) if reduction == "none" else out

    specs = (P("data"), P(), P("data"), P())
    _, (got, got_g) = _unsharded_and_sharded(mesh, loss, (ht, wt, hs, ws), specs, (2, 3))
    want, want_g = jax.value_and_grad(lambda hs, ws: loss(ht, wt, hs, ws, gf=None), (0, 1))(hs, ws)


@pytest.fixture(scope="module")
def mesh_2d():
    if jax.device_count() < 4:
        pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=4")
    return Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("data", "vocab"))


def _vocab_parallel_data(seed=7):
    rng = np.random.default_rng(seed)
    n, h_t, h_s, v = 12, 5, 4, 16
    ht, hs = rng.normal(size=(n, h_t)), rng.normal(size=(n, h_s))
    wt, ws = rng.normal(size=(h_t, v)) * 2, rng.normal(size=(h_s, v))
    labels = rng.integers(0, v, size=n)
    labels[3] = -100  # ignore_index
    labels[7] = v - 1  # the last column of the last shard
    mask = np.ones(n, bool)
    mask[5] = False  # dropped: whatever its hidden states hold never counts
    hs[5] = np.nan
    return ht, wt, hs, ws, labels, mask


_VOCAB_SPECS = (P("data"), P(None, "vocab"), P("data"), P(None, "vocab"), P("data"), P("data"))


@pytest.mark.parametrize(
    ("direction", "temperature", "grad_filter"),
    [
        ("forward", 1.0, None),
        ("forward", 1.7, None),
        ("reverse", 1.7, None),
        ("jsd", 1.7, None),
        ("forward", 1.7, 0.0),
    ],
)
@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_fused_linear_kl_vocabulary_parallel_matches_unsharded(
    mesh_2d, direction, reduction, temperature, grad_filter
):
    """Tokens over "data", both heads split by vocabulary over "vocab" (each device holds only
    [H, V/2] columns): values and gradients (student hidden and weight) equal the unsharded
    computation, with a mask, labels (ignore_index, the hard term) and a temperature; "mean"
    counts each token once (not once per vocabulary shard). With ``grad_filter=0`` too (its
    loop's sums of the per-token derivatives do not vary over the vocabulary split)."""
    ht, wt, hs, ws, labels, mask = _vocab_parallel_data()
    kw = dict(
        direction=direction,
        temperature=temperature,
        hard_weight=0.3,
        chunk_size=4,
        grad_filter=grad_filter,
    )

    def fused(ht, wt, hs, ws, labels, mask, axis_name=None, count=None):
        return kldiv.fused_linear_kl(
            ht, wt, hs, ws, reduction=reduction, labels=labels, mask=mask, count=count,
            axis_name=axis_name, **kw,
        )  # fmt: skip

    position = 1.0 + np.arange(len(hs))  # a different weight per token for reduction="none"

    def loss(*args):
        out = fused(*args)
        return (jnp.sum(out * position) if reduction == "none" else out), out

    (want, want_vals), want_g = jax.value_and_grad(loss, (2, 3), has_aux=True)(
        ht, wt, hs, ws, labels, mask
    )

    def step(ht, wt, hs, ws, labels, mask):
        def sharded_loss(hs, ws):
            count = None
            if reduction == "mean":  # the global number of kept tokens
                kept = jnp.asarray(mask) & (labels != -100)
                count = kldiv.count_kept(kept, axis_name="data")
            out = fused(ht, wt, hs, ws, labels, mask, axis_name="vocab", count=count)
            if reduction == "none":
                rows = jax.lax.axis_index("data") * out.shape[0] + jnp.arange(out.shape[0])
                return jax.lax.psum(jnp.sum(out * (1.0 + rows)), "data"), out
            total = jax.lax.psum(out, "data")
            return total, total

        return jax.value_and_grad(sharded_loss, (0, 1), has_aux=True)(hs, ws)

    vals_spec = P("data") if reduction == "none" else P()
    out_specs = ((P(), vals_spec), (P("data"), P(None, "vocab")))
    (got, got_vals), got_g = jax.jit(
        jax.shard_map(step, mesh=mesh_2d, in_specs=_VOCAB_SPECS, out_specs=out_specs)
    )(ht, wt, hs, ws, labels, mask)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    if reduction == "none":
        np.testing.assert_allclose(got_vals, want_vals, rtol=1e-12, atol=1e-15)
        assert got_vals[5] == 0 and got_vals[3] == 0
    for g, w in zip(got_g, want_g, strict=True):
        assert np.all(np.isfinite(g))
        np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-13)


def test_fused_linear_kl_vocabulary_parallel_traced_temperature_and_weights(mesh_2d):
    """Gradients w.r.t. a traced temperature and the term weights sum over token shards only
    (every vocabulary shard holds the same per-token values)."""
    ht, wt, hs, ws, labels, mask = _vocab_parallel_data(8)

    def loss(hs, ws, t, soft_w, ht, wt, labels, mask, axis_name=None):
        return kldiv.fused_linear_kl(
            ht, wt, hs, ws, reduction="sum", labels=labels, mask=mask, temperature=t,
            hard_weight=0.5, soft_weight=soft_w, axis_name=axis_name, chunk_size=4,
        )  # fmt: skip

    args = (jnp.asarray(1.3), jnp.asarray(0.8))
    want, want_g = jax.value_and_grad(loss, (0, 1, 2, 3))(hs, ws, *args, ht, wt, labels, mask)

    def step(ht, wt, hs, ws, labels, mask, t, soft_w):
        def sharded(hs, ws, t, soft_w):
            out = loss(hs, ws, t, soft_w, ht, wt, labels, mask, axis_name="vocab")
            return jax.lax.psum(out, "data")

        return jax.value_and_grad(sharded, (0, 1, 2, 3))(hs, ws, t, soft_w)

    in_specs = (*_VOCAB_SPECS, P(), P())
    out_specs = (P(), (P("data"), P(None, "vocab"), P(), P()))
    got, got_g = jax.jit(jax.shard_map(step, mesh=mesh_2d, in_specs=in_specs, out_specs=out_specs))(
        ht, wt, hs, ws, labels, mask, *args
    )
    np.testing.assert_allclose(got, want, rtol=1e-12)
    for g, w in zip(got_g, want_g, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-13)


def test_fused_linear_kl_vocabulary_parallel_errors(mesh_2d):
    ht, wt, hs, ws, labels, mask = _vocab_parallel_data()

    def run(fn, replicated_weights=False):
        w_spec = P() if replicated_weights else P(None, "vocab")
        specs = (P("data"), w_spec, P("data"), w_spec)
        return jax.jit(jax.shard_map(fn, mesh=mesh_2d, in_specs=specs, out_specs=P()))(
            ht, wt, hs, ws
        )

    def with_vocab_size(ht, wt, hs, ws):
        out = kldiv.fused_linear_kl(
            ht, wt, hs, ws, reduction="sum", vocab_size=6, axis_name="vocab"
        )
        return jax.lax.psum(out, "data")

    with pytest.raises(ValueError, match="kldiv: `vocab_size` cannot be combined with `axis_name`"):
        run(with_vocab_size)

    def replicated(ht, wt, hs, ws):
        out = kldiv.fused_linear_kl(ht, wt, hs, ws, reduction="sum", axis_name="vocab")
        return jax.lax.psum(out, "data")

    with pytest.raises(ValueError, match="`student_weight` .* is replicated over \\['vocab'\\]"):
        run(replicated, replicated_weights=True)

    def unbound(ht, wt, hs, ws):
        out = kldiv.fused_linear_kl(ht, wt, hs, ws, reduction="sum", axis_name="model")
        return jax.lax.psum(out, "data")

    with pytest.raises(ValueError, match="kldiv: `axis_name`='model' names no mapped axis"):
        run(unbound)


@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_fused_linear_kl_data_parallel_with_a_sharded_mask(mesh, reduction):
    """A mask sharded with the tokens (it varies over the mapped axis): the per-token weights of
    the reduction are each shard's own, not summed over the shards; "mean" with the global
    count."""
    rng = np.random.default_rng(9)
    n, h, v = 16, 5, 12
    ht, hs = rng.normal(size=(n, h)), rng.normal(size=(n, h))
    wt, ws = rng.normal(size=(h, v)), rng.normal(size=(h, v))
    mask = rng.random(n) < 0.7

    def loss(ht, wt, hs, ws, mask, count=None):
        out = kldiv.fused_linear_kl(
            ht, wt, hs, ws, reduction=reduction, mask=mask, count=count, chunk_size=2
        )
        return jnp.sum(out) if reduction == "none" else out

    def sharded(ht, wt, hs, ws, mask):
        count = kldiv.count_kept(mask, axis_name="data") if reduction == "mean" else None
        return loss(ht, wt, hs, ws, mask, count)

    specs = (P("data"), P(), P("data"), P(), P("data"))
    want = jax.value_and_grad(loss, (2, 3))(ht, wt, hs, ws, mask)

    def step(*xs):
        return jax.value_and_grad(lambda *ys: jax.lax.psum(sharded(*ys), "data"), (2, 3))(*xs)

    out_specs = (P(), (P("data"), P()))
    got = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=specs, out_specs=out_specs))(
        ht, wt, hs, ws, mask
    )
    np.testing.assert_allclose(got[0], want[0], rtol=1e-12)
    for g, w in zip(got[1], want[1], strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("grad_filter", [None, 0.0])
@pytest.mark.parametrize("check_vma", [True, False])
def test_fused_linear_kl_vocabulary_parallel_replicated_tokens(check_vma, grad_filter):
    """Vocabulary split over all 4 devices, tokens replicated, with and without shard_map's
    varying-axes checks: the hidden states' gradient is the psum of the per-shard products
    either way (through the cast's transpose or explicitly); with ``grad_filter=0`` as well."""
    if jax.device_count() < 4:
        pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=4")
    mesh_v = Mesh(np.array(jax.devices()[:4]), ("vocab",))
    rng = np.random.default_rng(10)
    ht, hs = rng.normal(size=(6, 3)), rng.normal(size=(6, 3))
    wt, ws = rng.normal(size=(3, 16)), rng.normal(size=(3, 16))

    def loss(hs, ws, wt, axis_name=None):
        return kldiv.fused_linear_kl(
            ht,
            wt,
            hs,
            ws,
            reduction="mean",
            temperature=1.3,
            axis_name=axis_name,
            grad_filter=grad_filter,
        )

    want, want_g = jax.value_and_grad(loss, (0, 1))(hs, ws, wt)

    def step(hs, ws, wt):
        return jax.value_and_grad(lambda a, b: loss(a, b, wt, "vocab"), (0, 1))(hs, ws)

    specs = (P(), P(None, "vocab"), P(None, "vocab"))
    got, got_g = jax.jit(
        jax.shard_map(
            step,
            mesh=mesh_v,
            in_specs=specs,
            out_specs=(P(), (P(), P(None, "vocab"))),
            check_vma=check_vma,
        )
    )(hs, ws, wt)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    for g, w in zip(got_g, want_g, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("impl", ["xla", "chunked", "pallas"])
def test_every_impl_with_rows_sharded_over_two_mesh_axes(mesh_2d, impl):
    """Rows split over both axes of a 2 × 2 mesh, the model prior replicated over both: each
    impl (Pallas interpret mode gathers over the pair of axes) equals the unsharded values and
    gradients."""
    rng = np.random.default_rng(8)
    a, b = rng.normal(size=(8, 16)) * 3, rng.normal(size=(16,))
    a[2, 5] = -np.inf

    def loss(x, y):
        return jnp.sum(kldiv.kl_from_logits(x, y, temperature=0.7, impl=impl))

    want, want_g = jax.value_and_grad(loss, (0, 1))(a, b)

    def step(x, y):
        axes = ("data", "vocab")
        return jax.value_and_grad(lambda *z: jax.lax.psum(loss(*z), axes), (0, 1))(x, y)

    specs = (P(("data", "vocab")), P())
    got, got_g = jax.jit(jax.shard_map(step, mesh=mesh_2d, in_specs=specs, out_specs=(P(), specs)))(
        a, b
    )
    np.testing.assert_allclose(got, want, rtol=1e-12)
    for g, w in zip(got_g, want_g, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-13)
