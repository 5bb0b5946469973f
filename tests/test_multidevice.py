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


@pytest.mark.parametrize("impl", ["xla", "chunked", "pallas", "auto"])
@pytest.mark.parametrize("prior", ["replicated", "sharded"])
def test_every_impl_under_shard_map_with_replicated_and_sharded_inputs(mesh, impl, prior):
    """Data parallel: the teacher sharded over examples, the model a replicated [V] prior (its
    gradient is the sum over shards) or sharded like the teacher; the default check_vma=True."""
    if impl == "pallas" and jax.default_backend() != "gpu":
        pytest.xfail(
            "Pallas interpret mode (off GPU) fails inside shard_map with check_vma=True in JAX "
            "0.10.2: its grid scan's carry loses the varying axes (a JAX bug, not kldiv's)"
        )
    rng = np.random.default_rng(5)
    a = rng.normal(size=(8, 16)) * 2
    b = rng.normal(size=(16,)) if prior == "replicated" else rng.normal(size=(8, 16))
    where = np.ones((8, 16), bool)
    where[:, 3] = False

    def loss(x, y, w):
        return jnp.sum(kldiv.kl_from_logits(x, y, where=w, temperature=2.0, impl=impl))

    b_spec = P() if prior == "replicated" else P("data")
    (want, want_g), (got, got_g) = _unsharded_and_sharded(
        mesh, loss, (a, b, where), (P("data"), b_spec, P("data")), (0, 1)
    )
    np.testing.assert_allclose(got, want, rtol=1e-12)
    for g, w in zip(got_g, want_g, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("impl", ["xla", "chunked", "auto"])
def test_softcap_under_shard_map_with_a_replicated_prior(mesh, impl):
    """Data parallel with soft-capped and scaled logits (the Pallas kernel does not take them
    yet): a replicated model prior gets the sum of the shards' gradients."""
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
