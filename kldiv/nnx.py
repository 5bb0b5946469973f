"""Flax NNX glue: a Gaussian encoder head, the negative ELBO, and a compile-once train step.

Import it explicitly (``import kldiv.nnx``); ``import kldiv`` never imports flax.

* :class:`GaussianHead` — the usual VAE encoder head: two linear projections to the mean and the
  log-variance of q(z|x) = N(μ, diag e^{log_var}) and a reparameterised sample
  z = μ + e^{log_var/2}·ε, ε ~ N(0, I), with ε drawn from a named ``nnx.Rngs`` stream
  (``"sample"`` by default) that the head owns, so the model needs no key argument.
* :func:`negative_elbo` — −ELBO from per-example log-likelihoods and the head's (μ, log_var):
  ``kldiv.reduce(−log p(x|z) + β·KL(q(z|x) ‖ N(0, I)), reduction, ...)`` with the KL from
  :func:`kldiv.gaussian.kl_standard_normal` (summed over latents, never averaged), and an
  explicit ``reduction=`` (no default) and ``dataset_size``.
* :func:`make_train_step` — ``nnx.jit`` of ``nnx.value_and_grad`` + ``optimizer.update``: a train
  step that compiles once per input shape.

A VAE train step is then::

    import jax, optax
    import kldiv.nnx
    from flax import nnx

    class VAE(nnx.Module):
        def __init__(self, rngs: nnx.Rngs):
            self.enc = nnx.Linear(64, 32, rngs=rngs)
            self.head = kldiv.nnx.GaussianHead(32, 8, rngs=rngs)   # noise from rngs.sample
            self.dec = nnx.Linear(8, 64, rngs=rngs)

        def __call__(self, x):
            z, mean, log_var = self.head(jax.nn.relu(self.enc(x)))
            return self.dec(z), mean, log_var

    def loss_fn(model, x):
        logits, mean, log_var = model(x)
        log_lik = -optax.sigmoid_binary_cross_entropy(logits, x).sum(-1)   # per example
        return kldiv.nnx.negative_elbo(log_lik, mean, log_var,
                                       reduction="dataset", dataset_size=N)

    model = VAE(nnx.Rngs(params=0, sample=1))
    optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
    train_step = kldiv.nnx.make_train_step(loss_fn)
    loss = train_step(model, optimizer, x_batch)       # updates model and optimizer in place

References: Kingma & Welling (2014), "Auto-encoding variational Bayes" (reparameterisation, §2.4;
the minibatch ELBO estimator, eq. 8; the Gaussian KL, appendix B); Higgins et al. (2017) (β).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.typing import ArrayLike

from kldiv import _checks
from kldiv.gaussian import kl_standard_normal
from kldiv.reductions import Reduction, reduce

__all__ = ["GaussianHead", "make_train_step", "negative_elbo"]


class GaussianHead(nnx.Module):
    """VAE encoder head: features → (z, μ, log σ²) with a reparameterised sample z.

    μ = W_μ x + b_μ and log σ² = W_v x + b_v (two ``nnx.Linear`` layers, ``in_features`` →
    ``latent_dim``), and z = μ + exp(log σ² / 2) ⊙ ε with ε ~ N(0, I) (Kingma & Welling 2014,
    §2.4), so gradients flow to both projections through the sample.

    Randomness: at construction the head forks its own stream from ``rngs[rng_collection]``
    (``"sample"`` by default; an ``nnx.Rngs`` without that stream falls back to its ``default``
    stream, as everywhere in NNX). Each call draws one key from that stream and advances its
    counter, so repeated calls give fresh noise and are reproducible from the seed; under
    ``nnx.jit`` the counter is carried as model state (no retracing). Pass ``rngs=`` to a call (an
    ``nnx.Rngs``, an ``nnx.RngStream`` or a key) to draw from elsewhere, or
    ``deterministic=True`` to return z = μ (evaluation, reconstructions).

    Args:
      in_features: size of the input features (last axis).
      latent_dim: D, the number of latent dimensions.
      rngs: ``nnx.Rngs`` for the parameters (``params`` stream) and the noise stream.
      rng_collection: name of the noise stream (default ``"sample"``).
      dtype, param_dtype: passed to both ``nnx.Linear`` layers.

    Call:
      ``head(x, *, deterministic=False, rngs=None) -> (z, mean, log_var)``, each ``[..., D]``
      for ``x`` of shape ``[..., in_features]``; ε has the dtype of μ. Feed ``mean, log_var``
      to :func:`negative_elbo` or :func:`kldiv.gaussian.kl_standard_normal`.

    Examples:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> import kldiv.nnx
      >>> head = kldiv.nnx.GaussianHead(16, 4, rngs=nnx.Rngs(params=0, sample=1))
      >>> features = jnp.ones((2, 16))  # [batch, in_features]
      >>> z, mean, log_var = head(features)  # z ~ N(mean, diag exp(log_var))
      >>> z.shape, mean.shape, log_var.shape
      ((2, 4), (2, 4), (2, 4))
      >>> z_eval, mean, _ = head(features, deterministic=True)  # z = mean, no noise
      >>> bool(jnp.all(z_eval == mean))
      True
      >>> kldiv.kl_standard_normal(mean, log_var).shape  # one KL per example
      (2,)
    """

    def __init__(
        self,
        in_features: int,
        latent_dim: int,
        *,
        rngs: nnx.Rngs,
        rng_collection: str = "sample",
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
    ):
        if not isinstance(rngs, nnx.Rngs):
            raise TypeError(f"kldiv: GaussianHead needs `rngs` of type nnx.Rngs; got {type(rngs)}.")
        self.mean = nnx.Linear(
            in_features, latent_dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )
        self.log_var = nnx.Linear(
            in_features, latent_dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )
        self.rng_collection = rng_collection
        try:
            stream = rngs[rng_collection]
        except KeyError:
            raise ValueError(
                f"kldiv: GaussianHead draws its noise from the {rng_collection!r} rng stream, "
                f"but `rngs` has neither that stream nor a default one (streams: {list(rngs)}); "
                f"create it e.g. as nnx.Rngs(params=0, {rng_collection}=1)."
            ) from None
        self.rngs = stream.fork()

    def __call__(
        self,
        x: jax.Array,
        *,
        deterministic: bool = False,
        rngs: nnx.Rngs | nnx.RngStream | jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        mean = self.mean(x)
        log_var = self.log_var(x)
        if deterministic:
            return mean, mean, log_var
        if rngs is None:
            key = self.rngs()
        elif isinstance(rngs, nnx.Rngs):
            key = rngs[self.rng_collection]()
        elif isinstance(rngs, nnx.RngStream):
            key = rngs()
        else:
            key = rngs
        eps = jax.random.normal(key, mean.shape, mean.dtype)
        z = mean + jnp.exp(0.5 * log_var) * eps
        return z, mean, log_var


def negative_elbo(
    log_likelihood: ArrayLike,
    mean: ArrayLike,
    log_var: ArrayLike,
    *,
    reduction: Reduction,
    dataset_size: int | ArrayLike | None = None,
    beta: float | ArrayLike = 1.0,
    mask: ArrayLike | None = None,
) -> jax.Array:
    """−ELBO = reduce(−log p(x|z) + β·KL(N(μ, diag e^{log_var}) ‖ N(0, I)), reduction).

    Per example, −log_likelihood plus β times :func:`kldiv.gaussian.kl_standard_normal` (the KL
    summed over the D latents), then one :func:`kldiv.reduce` over examples. Both terms share the
    one reduction, so their relative weight is exactly β whatever ``reduction`` is (the common
    bug — reconstruction averaged over pixels, KL summed, or the two reduced differently —
    silently rescales β).

    Reductions: ``"dataset"`` with ``dataset_size=N`` is N/B × the minibatch sum, an unbiased
    estimate of the negative ELBO of the whole training set (Kingma & Welling 2014, eq. 8); use it
    when the objective must be the full-data ELBO (e.g. alongside a prior on the weights, or to
    report the bound). ``"mean"`` is the same objective divided by N (per-example nats; the same
    optimum and, with Adam, nearly the same trajectory). ``"sum"`` and ``"batchmean"`` as in
    :func:`kldiv.reduce`.

    Args:
      log_likelihood: log p(x|z) per example ``[B]`` (already summed over the data dimensions),
        e.g. ``-optax.sigmoid_binary_cross_entropy(logits, x).sum(-1)``.
      mean, log_var: the encoder's μ and log σ², ``[B, D]``.
      reduction: ``"none"``, ``"sum"``, ``"mean"``, ``"batchmean"`` or ``"dataset"`` (no default).
      dataset_size: N, required for ``"dataset"`` (rejected otherwise).
      beta: weight of the KL term (β-VAE, Higgins et al. 2017; KL annealing).
      mask: optional keep-mask ``[B]`` (e.g. padded examples); see :func:`kldiv.reduce`.

    Returns:
      A scalar (or the per-example values for ``"none"``); float32 for 16-bit inputs, else the
      widest input dtype.

    Raises:
      TypeError: non-floating ``log_likelihood``.
      ValueError: ``log_likelihood`` not one value per example (e.g. per pixel), or a reduction
        error from :func:`kldiv.reduce`.

    Examples:
      >>> import jax.numpy as jnp
      >>> import kldiv.nnx
      >>> log_likelihood = jnp.array([-10.0, -12.0])  # one log-likelihood per example, [B]
      >>> mean = jnp.array([[0.0, 0.0], [0.5, -1.0]])  # the encoder's μ, [B, D]
      >>> log_var = jnp.array([[0.0, 0.0], [-0.5, 0.2]])
      >>> loss = kldiv.nnx.negative_elbo(log_likelihood, mean, log_var, reduction="mean")
      >>> print(f"{loss:.4f}")
      11.3445
      >>> loss = kldiv.nnx.negative_elbo(
      ...     log_likelihood, mean, log_var, reduction="dataset", dataset_size=1000
      ... )
      >>> print(f"{loss:.1f}")  # N/B × the minibatch sum
      11344.5
    """
    _checks.check_floating("log_likelihood", log_likelihood)
    log_likelihood = jnp.asarray(log_likelihood)
    kl = kl_standard_normal(mean, log_var)
    _checks.check_broadcasts_to(
        "log_likelihood",
        log_likelihood.shape,
        kl.shape,
        f"one value per example, shape {kl.shape} (the batch axes of `mean` {jnp.shape(mean)}): "
        "sum it over the data dimensions first, e.g. `.sum(-1)`",
    )
    dtype = _checks.compute_dtype(kl, log_likelihood)
    values = beta * kl.astype(dtype) - log_likelihood.astype(dtype)
    return reduce(values, reduction, mask=mask, dataset_size=dataset_size)


def make_train_step(loss_fn: Callable[..., Any], *, has_aux: bool = False) -> Callable[..., Any]:
    """A jitted NNX train step: ``step(model, optimizer, *batch) -> loss_fn's output``.

    ``loss_fn(model, *batch)`` returns a scalar loss (or ``(loss, aux)`` with ``has_aux=True``).
    The step is ``nnx.jit`` of ``nnx.value_and_grad(loss_fn)`` (gradients with respect to the
    model's ``nnx.Param`` variables) followed by ``optimizer.update(model, grads)``; the model,
    its rng stream counters and the optimizer state are updated in place. With ``optimizer =
    nnx.Optimizer(model, tx, wrt=nnx.Param)`` it compiles once per set of batch shapes and
    dtypes. Configuration (reduction names, β as a Python number, dataset size) belongs in
    ``loss_fn``'s closure, not in ``batch``.

    Examples:
      >>> import jax.numpy as jnp
      >>> import optax
      >>> from flax import nnx
      >>> import kldiv.nnx
      >>> model = nnx.Linear(3, 1, rngs=nnx.Rngs(0))
      >>> optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
      >>> def loss_fn(model, x, y):
      ...     return jnp.mean((model(x)[:, 0] - y) ** 2)
      >>> train_step = kldiv.nnx.make_train_step(loss_fn)
      >>> x, y = jnp.ones((4, 3)), jnp.zeros(4)
      >>> losses = [float(train_step(model, optimizer, x, y)) for _ in range(3)]
      >>> losses[0] > losses[1] > losses[2]  # model and optimizer are updated in place
      True
    """
    grad_fn = nnx.value_and_grad(loss_fn, has_aux=has_aux)

    def step(model, optimizer, *batch):
        out, grads = grad_fn(model, *batch)
        optimizer.update(model, grads)
        return out

    return nnx.jit(step)
