"""Tests for kldiv.nnx: the Gaussian head, the negative ELBO, NNX and Linen train steps."""

from __future__ import annotations

import importlib.util
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import kldiv
from kldiv.gaussian import kl_standard_normal
from kldiv.nnx import GaussianHead, make_train_step, negative_elbo

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _set_head(head: GaussianHead, mean_bias, log_var_bias):
    """Zero kernels and given biases: the head then outputs constant (μ, log σ²)."""
    for layer, bias in ((head.mean, mean_bias), (head.log_var, log_var_bias)):
        layer.kernel[...] = jnp.zeros_like(layer.kernel[...])
        layer.bias[...] = jnp.asarray(bias, jnp.float32)


def _ref_kl(mean, log_var):
    """Float64 reference KL(N(μ, e^lv) ‖ N(0, 1)) summed over the last axis."""
    mean, log_var = np.asarray(mean, np.float64), np.asarray(log_var, np.float64)
    return 0.5 * np.sum(mean**2 + np.exp(log_var) - 1 - log_var, axis=-1)


# ---------------------------------------------------------------------------------------------
# GaussianHead


@pytest.mark.parametrize("batch", [(3,), (2, 3), ()])
def test_head_shapes_and_dtypes(batch):
    head = GaussianHead(5, 4, rngs=nnx.Rngs(params=0, sample=1))
    x = jnp.ones((*batch, 5), jnp.float32)
    z, mean, log_var = head(x)
    assert z.shape == mean.shape == log_var.shape == (*batch, 4)
    assert z.dtype == mean.dtype == log_var.dtype == jnp.float32
    z_det, mean_det, _ = head(x, deterministic=True)
    np.testing.assert_array_equal(z_det, mean_det)
    np.testing.assert_array_equal(mean_det, mean)


def test_head_reparameterisation_moments():
    head = GaussianHead(3, 4, rngs=nnx.Rngs(params=0, sample=7))
    mu = np.array([0.0, 1.5, -2.0, 0.3])
    lv = np.array([0.0, -1.0, 1.0, -4.0])
    _set_head(head, mu, lv)
    n = 40_000
    z, mean, log_var = head(jnp.ones((n, 3), jnp.float32))
    np.testing.assert_allclose(mean[0], mu, rtol=1e-6)
    np.testing.assert_allclose(log_var[0], lv, rtol=1e-6)
    z = np.asarray(z, np.float64)
    sd = np.exp(0.5 * lv)
    # sample mean within 5 standard errors, sample variance within 5 standard errors
    assert np.all(np.abs(z.mean(0) - mu) < 5 * sd / np.sqrt(n))
    assert np.all(np.abs(z.var(0) / np.exp(lv) - 1) < 5 * np.sqrt(2 / n))
    # the standardised noise is N(0, I): uncorrelated across latents
    eps = (z - mu) / sd
    corr = np.corrcoef(eps.T)
    assert np.max(np.abs(corr - np.eye(4))) < 5 / np.sqrt(n)


def test_head_noise_from_explicit_key_is_exact():
    head = GaussianHead(2, 3, rngs=nnx.Rngs(params=0, sample=1))
    x = jax.random.normal(jax.random.key(3), (5, 2), jnp.float32)
    key = jax.random.key(42)
    z, mean, log_var = head(x, rngs=key)
    eps = jax.random.normal(key, (5, 3), jnp.float32)
    np.testing.assert_allclose(z, mean + np.exp(0.5 * np.asarray(log_var)) * eps, rtol=1e-6)
    count = int(head.rngs.count[...])
    head(x, rngs=key)
    assert int(head.rngs.count[...]) == count  # an explicit key leaves the own stream alone
    z2, _, _ = head(x, rngs=nnx.Rngs(sample=5))
    z3, _, _ = head(x, rngs=nnx.Rngs(sample=5).sample)
    np.testing.assert_array_equal(z2, z3)


def test_head_rng_stream_advances_and_is_reproducible():
    def make():
        return GaussianHead(3, 2, rngs=nnx.Rngs(params=0, sample=1))

    head, again = make(), make()
    x = jnp.ones((4, 3), jnp.float32)
    c0 = int(head.rngs.count[...])
    z1, _, _ = head(x)
    z2, _, _ = head(x)
    assert int(head.rngs.count[...]) == c0 + 2
    assert not np.allclose(z1, z2)
    np.testing.assert_array_equal(again(x)[0], z1)  # same seeds, same draws
    np.testing.assert_array_equal(again(x)[0], z2)

    # under nnx.jit the counter is carried as state: fresh noise on every call, no retrace
    traces = []

    @nnx.jit
    def sample(head, x):
        traces.append(1)
        return head(x)[0]

    draws = [np.asarray(sample(head, x)) for _ in range(3)]
    assert int(head.rngs.count[...]) == c0 + 5
    assert len(traces) == 1
    assert not np.allclose(draws[0], draws[1]) and not np.allclose(draws[1], draws[2])


def test_head_stream_default_fallback_and_errors():
    head = GaussianHead(2, 2, rngs=nnx.Rngs(0))  # no "sample" stream: the default one is used
    assert head(jnp.ones((1, 2), jnp.float32))[0].shape == (1, 2)
    custom = GaussianHead(2, 2, rngs=nnx.Rngs(params=0, noise=1), rng_collection="noise")
    assert custom(jnp.ones((1, 2), jnp.float32))[0].shape == (1, 2)
    with pytest.raises(ValueError, match="'sample' rng stream"):
        GaussianHead(2, 2, rngs=nnx.Rngs(params=0))
    with pytest.raises(TypeError, match="nnx.Rngs"):
        GaussianHead(2, 2, rngs=0)


def test_gradients_flow_through_the_sample():
    head = GaussianHead(3, 4, rngs=nnx.Rngs(params=0, sample=1))
    rng = np.random.default_rng(0)
    _set_head(head, rng.normal(size=4), rng.normal(size=4))
    x = jnp.zeros((6, 3), jnp.float32)
    key = jax.random.key(9)
    eps = np.asarray(jax.random.normal(key, (6, 4), jnp.float32), np.float64)

    def f(head):
        z, _, _ = head(x, rngs=key)
        return jnp.sum(z)

    grads = nnx.grad(f)(head)
    # z = μ + exp(lv/2)·ε: ∂Σz/∂b_μ = batch size, ∂Σz/∂b_lv = Σ_b ½ exp(lv/2) ε_b
    np.testing.assert_allclose(grads.mean.bias[...], np.full(4, 6.0), rtol=1e-6)
    lv = np.asarray(head.log_var.bias[...], np.float64)
    want = 0.5 * np.exp(0.5 * lv) * eps.sum(0)
    np.testing.assert_allclose(grads.log_var.bias[...], want, rtol=1e-5, atol=1e-6)
    assert np.all(np.isfinite(grads.log_var.kernel[...]))


# ---------------------------------------------------------------------------------------------
# negative_elbo


@pytest.mark.parametrize("reduction", ["none", "sum", "mean", "batchmean", "dataset"])
def test_negative_elbo_matches_reference(reduction):
    rng = np.random.default_rng(1)
    mean = rng.normal(size=(7, 3)).astype(np.float32)
    log_var = rng.normal(size=(7, 3)).astype(np.float32)
    log_lik = -rng.gamma(2.0, size=7).astype(np.float32) * 10
    mask = rng.random(7) > 0.3
    beta = 0.7
    per_example = beta * _ref_kl(mean, log_var) - log_lik.astype(np.float64)
    extra = {"dataset_size": 1000} if reduction == "dataset" else {}
    for m in (None, mask):
        kept = per_example if m is None else np.where(m, per_example, 0)
        want = {
            "none": kept,
            "sum": kept.sum(),
            "mean": kept.sum() / (7 if m is None else m.sum()),
            "batchmean": kept.sum() / 7,
            "dataset": kept.sum() * 1000 / 7,
        }[reduction]
        got = negative_elbo(log_lik, mean, log_var, reduction=reduction, beta=beta, mask=m, **extra)
        assert got.dtype == jnp.float32
        np.testing.assert_allclose(got, want, rtol=2e-6)


def test_negative_elbo_errors_name_the_problem():
    mean = jnp.zeros((4, 2), jnp.float32)
    with pytest.raises(ValueError, match=r"one value per example.*\(4,\).*\(4, 64\)"):
        negative_elbo(jnp.zeros((4, 64), jnp.float32), mean, mean, reduction="mean")
    with pytest.raises(ValueError, match="dataset_size"):
        negative_elbo(jnp.zeros(4, jnp.float32), mean, mean, reduction="dataset")
    with pytest.raises(TypeError, match="log_likelihood"):
        negative_elbo(jnp.zeros(4, jnp.int32), mean, mean, reduction="mean")
    with pytest.raises(ValueError, match="unknown reduction"):
        negative_elbo(jnp.zeros(4, jnp.float32), mean, mean, reduction="avg")


def test_negative_elbo_dtypes():
    mean = jnp.zeros((2, 3), jnp.bfloat16)
    out = negative_elbo(jnp.zeros(2, jnp.bfloat16), mean, mean, reduction="sum")
    assert out.dtype == jnp.float32 and float(out) == 0.0
    out64 = negative_elbo(np.ones(2), np.ones((2, 3)), np.zeros((2, 3)), reduction="sum")
    assert out64.dtype == jnp.float64
    np.testing.assert_allclose(out64, 2 * 1.5 - 2, rtol=1e-15)


# ---------------------------------------------------------------------------------------------
# Train steps


class _VAE(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.enc = nnx.Linear(16, 16, rngs=rngs)
        self.head = GaussianHead(16, 3, rngs=rngs)
        self.dec = nnx.Linear(3, 16, rngs=rngs)

    def __call__(self, x):
        z, mean, log_var = self.head(jax.nn.relu(self.enc(x)))
        return self.dec(z), mean, log_var


def _data(n=64, dim=16, seed=0):
    """n noisy copies of 4 binary prototypes, in [0, 1]."""
    rng = np.random.default_rng(seed)
    proto = rng.random((4, dim)) > 0.5
    x = proto[rng.integers(0, 4, n)] + 0.1 * rng.normal(size=(n, dim))
    return np.clip(x, 0, 1).astype(np.float32)


def _vae_loss(counter=None):
    def loss_fn(model, x):
        if counter is not None:
            counter.append(1)  # runs only while tracing
        logits, mean, log_var = model(x)
        log_lik = -optax.sigmoid_binary_cross_entropy(logits, x).sum(-1)
        return negative_elbo(log_lik, mean, log_var, reduction="dataset", dataset_size=64)

    return loss_fn


def test_nnx_train_step_lowers_the_loss():
    x = _data()
    model = _VAE(nnx.Rngs(params=0, sample=1))
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    loss_fn = _vae_loss()

    @nnx.jit
    def explicit_step(model, optimizer, x):
        loss, grads = nnx.value_and_grad(loss_fn)(model, x)
        optimizer.update(model, grads)
        return loss

    step = make_train_step(loss_fn)
    count = int(model.head.rngs.count[...])
    losses = [float(explicit_step(model, optimizer, x)) for _ in range(30)]
    losses += [float(step(model, optimizer, x)) for _ in range(30)]
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])
    assert int(optimizer.step[...]) == 60
    assert int(model.head.rngs.count[...]) == count + 60  # fresh noise on every step


def test_make_train_step_compiles_once_per_shape():
    x = _data()
    model = _VAE(nnx.Rngs(params=0, sample=1))
    optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
    traces: list[int] = []
    step = make_train_step(_vae_loss(traces))
    for i in range(5):
        step(model, optimizer, x[i * 8 : (i + 1) * 8])
    assert len(traces) == 1
    step(model, optimizer, x[:16])  # a new batch shape compiles once more
    step(model, optimizer, x[16:32])
    assert len(traces) == 2


def test_make_train_step_has_aux():
    x = _data()
    model = _VAE(nnx.Rngs(params=0, sample=1))
    optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)

    def loss_fn(model, x):
        logits, mean, log_var = model(x)
        log_lik = -optax.sigmoid_binary_cross_entropy(logits, x).sum(-1)
        kl = kldiv.reduce(kl_standard_normal(mean, log_var), "mean")
        return negative_elbo(log_lik, mean, log_var, reduction="mean"), kl

    loss, kl = make_train_step(loss_fn, has_aux=True)(model, optimizer, x)
    assert np.isfinite(loss) and float(kl) >= 0


def _load_example(name):
    spec = importlib.util.spec_from_file_location(f"_example_{name}", ROOT / "examples" / name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # Linen dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def test_linen_train_state_step():
    from flax.training import train_state

    linen = _load_example("linen_train_state.py")
    x = _data(dim=64)  # the example's VAE models 8×8 images
    vae = linen.VAE(hidden=16, latent=3)
    key = jax.random.key(0)
    params = vae.init({"params": key, "sample": key}, x[:1])["params"]
    state = train_state.TrainState.create(apply_fn=vae.apply, params=params, tx=optax.adam(1e-2))

    def loss_fn(params, apply_fn, x, key):
        logits, mean, log_var = apply_fn({"params": params}, x, rngs={"sample": key})
        log_lik = -optax.sigmoid_binary_cross_entropy(logits, x).sum(-1)
        return negative_elbo(log_lik, mean, log_var, reduction="dataset", dataset_size=64)

    # the step's loss is the float64 reference −ELBO of the same forward pass
    logits, mean, log_var = vae.apply({"params": params}, x, rngs={"sample": key})
    lg, xx = np.asarray(logits, np.float64), x.astype(np.float64)
    log_lik = np.sum(xx * -np.logaddexp(0, -lg) + (1 - xx) * -np.logaddexp(0, lg), -1)
    want = np.sum(_ref_kl(mean, log_var) - log_lik)  # dataset_size = batch size

    step = linen.make_step(loss_fn)
    state, first = step(state, x, key)
    np.testing.assert_allclose(first, want, rtol=1e-5)
    losses = [float(first)]
    for i in range(60):
        state, loss = step(state, x, jax.random.fold_in(key, i))
        losses.append(float(loss))
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])
    assert int(state.step) == 61


def test_import_kldiv_does_not_import_flax():
    code = "import kldiv, sys; assert 'flax' not in sys.modules, 'flax imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
