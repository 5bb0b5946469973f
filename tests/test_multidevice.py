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


def test_tensor_parallel_vocabulary(mesh):
    """Logits split over the vocabulary (model axis): values and gradients equal unsharded."""
    rng = np.random.default_rng(2)
    a = rng.normal(size=(5, 32)) * 3
    b = rng.normal(size=(5, 32)) * 3
    a[:, 3] = b[:, 3] = -np.inf  # a masked entry in one shard
    a[1, 8:16] = -np.inf  # a whole shard of p empty for one row
    mesh_tp = Mesh(np.array(jax.devices()[:4]), ("model",))

    def loss(x, y, axis_name=None):
        vals = kldiv.kl_from_logits(x, y, temperature=1.5, axis_name=axis_name)
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
