"""The KL part of a VAE objective: β-weighting, annealing schedules, free bits, dataset scaling.

The negative ELBO of a VAE with encoder q_φ(z|x) and prior p(z), for a minibatch of M examples
from a data set of N, is estimated as

    −ELBO ≈ R(−E_q[log p_θ(x_i|z)]) + β · R(KL(q_φ(z|x_i) ‖ p(z))),

where R aggregates over examples (:func:`kldiv.reduce`) and KL is one value per example, summed
over the latent dimensions (never averaged over them; see :mod:`kldiv.gaussian`). Which R is a
modelling choice, so every helper here that aggregates over examples takes ``reduction=`` with no
default:

* ``"dataset"``: (N/M) Σ_i, the minibatch estimator of the whole-dataset ELBO
  (Kingma & Welling 2014, eq. 8 with the per-example estimator of eq. 10). Use the same R for
  the reconstruction term; its gradient is an unbiased estimate of the full-data gradient.
* ``"mean"``: (1/M) Σ_i, the per-example ELBO (the usual deep-learning loss; equals
  ``"dataset"`` divided by N, so it only rescales the learning rate).
* ``"sum"``: Σ_i over the minibatch. ``"batchmean"``: Σ_i / M with masked examples still counted.

β-VAE (Higgins et al. 2017) multiplies the KL by β; KL annealing / warm-up (Bowman et al. 2016;
Sønderby et al. 2016) makes β a function of the training step: pass any Optax schedule
(``optax.linear_schedule(0.0, 1.0, 10_000)``, ``optax.cosine_decay_schedule``, ...) or
:func:`cyclical_kl_schedule` (Fu et al. 2019) as ``beta`` together with ``step``.
Free bits (Kingma et al. 2016) keep each latent dimension's KL from being pushed below a floor
λ; see :func:`free_bits_kl`.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from kldiv import _checks, gaussian
from kldiv.reductions import Reduction, reduce

__all__ = [
    "Schedule",
    "cyclical_kl_schedule",
    "elbo_kl",
    "free_bits_kl",
    "kl_weight",
    "vae_kl",
]

# An Optax schedule: a function of the integer step count returning a scalar.
Schedule = Callable[[ArrayLike], ArrayLike]


def kl_weight(beta: float | ArrayLike | Schedule, step: ArrayLike | None = None) -> jax.Array:
    """The KL weight β at ``step``: ``beta(step)`` for a schedule, else ``beta`` itself.

    Args:
      beta: a number or scalar array (a fixed β), or a callable such as an Optax schedule
        ``optax.linear_schedule(0.0, 1.0, transition_steps=10_000)`` mapping the step to β.
      step: the training step (an int or an integer array, e.g. the optimiser's count); required
        with a schedule and rejected without one (a silently ignored step is a bug).

    Raises:
      ValueError: a schedule without ``step``, or ``step`` with a fixed β.

    Examples:
      >>> import jax.numpy as jnp
      >>> import kldiv
      >>> print(f"{kldiv.kl_weight(0.5):.2f}")  # a fixed β
      0.50
      >>> warmup = lambda step: jnp.minimum(1.0, step / 1000)  # any Optax-style schedule
      >>> print(f"{kldiv.kl_weight(warmup, step=250):.2f}")
      0.25
    """
    if callable(beta):
        if step is None:
            raise ValueError(
                "kldiv: `beta` is a schedule, so pass `step=` (the training step it is read at)."
            )
        return jnp.asarray(beta(step))
    if step is not None:
        raise ValueError(
            "kldiv: `step` was given but `beta` is a fixed value; pass a schedule (e.g. "
            "`optax.linear_schedule(0.0, 1.0, 10_000)`) as `beta` to anneal."
        )
    return jnp.asarray(beta)


def elbo_kl(
    kl: ArrayLike,
    *,
    reduction: Reduction,
    beta: float | ArrayLike | Schedule = 1.0,
    step: ArrayLike | None = None,
    mask: ArrayLike | None = None,
    dataset_size: int | ArrayLike | None = None,
    axis_name: str | tuple[str, ...] | None = None,
    count: ArrayLike | float | None = None,
    batch_size: ArrayLike | int | None = None,
) -> jax.Array:
    """The KL term of a (β-weighted, annealed) negative ELBO: β(step) · R(kl).

    Formula, with R = ``reduction`` over the examples (see :func:`kldiv.reduce`):

        ``"dataset"``:  β · (N/M) Σ_i KL_i      (Kingma & Welling 2014, eq. 8/10)
        ``"mean"``:     β · Σ_i m_i KL_i / Σ_i m_i
        ``"sum"``:      β · Σ_i m_i KL_i
        ``"batchmean"``: β · Σ_i m_i KL_i / M
        ``"none"``:     β · KL_i  (masked entries 0)

    Args:
      kl: one KL per example, e.g. ``kldiv.kl_standard_normal(mean, log_var)`` of shape ``[M]``
        (already summed over latent dimensions). Do not pass per-dimension terms here: R would
        then average over latent dimensions too; use :func:`free_bits_kl` for those.
      reduction: how to aggregate over examples; no default (see the module docstring for which
        an ELBO needs).
      beta: fixed β (β-VAE, Higgins et al. 2017; default 1, the ELBO) or an Optax schedule of
        the step (KL annealing).
      step: the training step, required with a schedule.
      mask, dataset_size, axis_name, count, batch_size: as :func:`kldiv.reduce` (``dataset_size``
        is N for ``"dataset"``).

    Returns:
      A scalar (``[M]`` for ``"none"``) in ``kl``'s dtype.

    Examples:
      >>> import jax.numpy as jnp
      >>> import kldiv
      >>> mean = jnp.array([[0.0, 0.0], [0.5, -1.0], [1.0, 0.5]])  # M = 3 examples, D = 2
      >>> log_var = jnp.array([[0.0, 0.0], [-0.5, 0.2], [0.1, 0.1]])
      >>> kl = kldiv.kl_standard_normal(mean, log_var)  # one KL per example
      >>> print(f"{kldiv.elbo_kl(kl, reduction='mean'):.4f}")
      0.4397
      >>> print(f"{kldiv.elbo_kl(kl, reduction='dataset', dataset_size=60_000):.1f}")
      26382.8
      >>> annealed = kldiv.elbo_kl(
      ...     kl, reduction="mean", beta=kldiv.cyclical_kl_schedule(1000), step=250
      ... )
      >>> print(f"{annealed:.4f}")
      0.2199
    """
    total = reduce(
        kl,
        reduction,
        mask=mask,
        dataset_size=dataset_size,
        axis_name=axis_name,
        count=count,
        batch_size=batch_size,
    )
    return kl_weight(beta, step).astype(total.dtype) * total


def _check_free_bits(free_bits, n_dims: int) -> None:
    if isinstance(free_bits, numbers.Real):
        if not float(free_bits) >= 0:
            raise ValueError(
                f"kldiv: `free_bits` must be ≥ 0 (nats per dimension); got {free_bits}."
            )
        return
    shape = jnp.shape(free_bits)
    if len(shape) > 1 or (len(shape) == 1 and shape[0] not in (1, n_dims)):
        raise ValueError(
            f"kldiv: `free_bits` must be a scalar or one floor per latent dimension (shape "
            f"({n_dims},)); got shape {shape}."
        )


def free_bits_kl(
    kl_per_dim: ArrayLike,
    free_bits: float | ArrayLike,
    *,
    reduction: Reduction,
    beta: float | ArrayLike | Schedule = 1.0,
    step: ArrayLike | None = None,
    mask: ArrayLike | None = None,
    dataset_size: int | ArrayLike | None = None,
    axis_name: str | tuple[str, ...] | None = None,
    count: ArrayLike | float | None = None,
    batch_size: ArrayLike | int | None = None,
) -> jax.Array:
    """The free-bits KL term (Kingma et al. 2016): a floor λ on each latent dimension's KL.

    Kingma et al. (2016, "Improved variational inference with inverse autoregressive flow",
    appendix C.8) replace the KL term by

        Σ_j max(λ_j, E_{x∼minibatch}[KL_j(x)]),

    where KL_j is latent dimension (or group) j's term. The floor applies to the minibatch
    aggregate, so a dimension whose average KL is below λ gets no gradient pressure towards the
    prior, while individual examples are free to vary. With a general reduction R this is

        β · Σ_j max(R_i[KL_ij], R_i[λ_j]),

    where R_i[λ_j] is λ_j aggregated like the KLs (λ for ``"mean"``, M·λ for ``"sum"``, N·λ for
    ``"dataset"``, kept fraction·λ for ``"batchmean"``), so every reduction applies the same floor
    per example. ``reduction="none"`` applies the floor per example instead: β·Σ_j max(KL_ij, λ_j)
    of shape ``[M]`` (a common variant).

    Args:
      kl_per_dim: per-dimension KL terms ``[M, D]`` (or ``[M, T, D]``), latent axis last, e.g.
        ``kldiv.kl_standard_normal(mean, log_var, per_dim=True)``. To floor groups of latents,
        sum each group first so that the last axis indexes groups.
      free_bits: λ ≥ 0 in nats per dimension: a scalar or one per dimension ``[D]``.
      reduction: how to aggregate over examples; no default.
      beta, step: the KL weight (number or Optax schedule), as :func:`elbo_kl`.
      mask, dataset_size, axis_name, count, batch_size: as :func:`kldiv.reduce` (the mask is over
        examples, shape ``kl_per_dim.shape[:-1]``).

    Returns:
      A scalar (``[M]`` or ``[M, T]`` for ``"none"``) in ``kl_per_dim``'s dtype.

    Raises:
      ValueError: negative λ, a λ shape that is neither scalar nor ``[D]``, ``kl_per_dim``
        without a latent axis, or any :func:`kldiv.reduce` error.

    Examples:
      >>> import jax.numpy as jnp
      >>> import kldiv
      >>> mean = jnp.array([[0.0, 0.0], [0.5, -1.0], [1.0, 0.5]])  # M = 3 examples, D = 2
      >>> log_var = jnp.array([[0.0, 0.0], [-0.5, 0.2], [0.1, 0.1]])
      >>> kl_per_dim = kldiv.kl_standard_normal(mean, log_var, per_dim=True)  # [M, D]
      >>> plain = kldiv.free_bits_kl(kl_per_dim, 0.0, reduction="mean")
      >>> floored = kldiv.free_bits_kl(kl_per_dim, 0.5, reduction="mean")  # λ = 0.5 nats
      >>> print(f"{plain:.4f} {floored:.4f}")
      0.4397 1.0000
    """
    _checks.check_floating("kl_per_dim", kl_per_dim)
    kl_per_dim = jnp.asarray(kl_per_dim)
    if kl_per_dim.ndim < 2:
        raise ValueError(
            "kldiv: `kl_per_dim` must be per-dimension terms [examples..., D] (latent axis last, "
            f"e.g. `kl_standard_normal(..., per_dim=True)`); got shape {kl_per_dim.shape}."
        )
    if not isinstance(free_bits, numbers.Real):
        _checks.check_floating("free_bits", free_bits)
    _check_free_bits(free_bits, kl_per_dim.shape[-1])
    dtype = kl_per_dim.dtype
    lam = jnp.asarray(free_bits, dtype)

    def agg(values):
        return reduce(
            values,
            reduction,
            mask=mask,
            dataset_size=dataset_size,
            axis_name=axis_name,
            count=count,
            batch_size=batch_size,
        )

    per_dim = jax.vmap(agg, in_axes=-1, out_axes=-1)(kl_per_dim)  # [D] or [..., D] for "none"
    unit = agg(jnp.ones(kl_per_dim.shape[:-1], dtype))  # R applied to 1 per example
    floored = jnp.maximum(per_dim, unit[..., None] * lam)
    return kl_weight(beta, step).astype(dtype) * jnp.sum(floored, axis=-1)


def vae_kl(
    mean: ArrayLike,
    log_var: ArrayLike,
    *,
    reduction: Reduction,
    beta: float | ArrayLike | Schedule = 1.0,
    step: ArrayLike | None = None,
    free_bits: float | ArrayLike | None = None,
    mask: ArrayLike | None = None,
    dataset_size: int | ArrayLike | None = None,
    axis_name: str | tuple[str, ...] | None = None,
    count: ArrayLike | float | None = None,
    batch_size: ArrayLike | int | None = None,
) -> jax.Array:
    """The whole KL term of a Gaussian VAE with a standard-normal prior, in one call.

    β(step) · R_i[Σ_j ½(μ_ij² + e^{lv_ij} − 1 − lv_ij)], i.e. :func:`elbo_kl` of
    :func:`kldiv.gaussian.kl_standard_normal` (summed over latent dimensions j, aggregated over
    examples i by ``reduction``); with ``free_bits`` = λ it is :func:`free_bits_kl` of the
    per-dimension terms instead: β · Σ_j max(R_i[KL_ij], R_i[λ_j]).

    Args:
      mean, log_var: the encoder's outputs ``[M, D]`` (latent axis last).
      reduction: ``"dataset"`` (with ``dataset_size`` = N) for the whole-dataset ELBO of Kingma &
        Welling (2014, eq. 8/10), ``"mean"`` for the per-example ELBO; no default.
      beta, step: fixed β or an Optax schedule with the step (annealing).
      free_bits: optional λ ≥ 0 per latent dimension (nats).
      mask, dataset_size, axis_name, count, batch_size: as :func:`kldiv.reduce`.

    Returns:
      A scalar (``[M]`` for ``"none"``) in the computation dtype of the inputs.

    Examples:
      >>> import jax.numpy as jnp
      >>> import kldiv
      >>> mean = jnp.array([[0.0, 0.0], [0.5, -1.0], [1.0, 0.5]])  # encoder outputs [M, D]
      >>> log_var = jnp.array([[0.0, 0.0], [-0.5, 0.2], [0.1, 0.1]])
      >>> print(f"{kldiv.vae_kl(mean, log_var, reduction='mean'):.4f}")
      0.4397
      >>> print(f"{kldiv.vae_kl(mean, log_var, reduction='mean', beta=4.0):.4f}")  # β-VAE
      1.7589
      >>> print(f"{kldiv.vae_kl(mean, log_var, reduction='mean', free_bits=0.5):.4f}")
      1.0000
    """
    kw: dict[str, Any] = dict(
        reduction=reduction,
        beta=beta,
        step=step,
        mask=mask,
        dataset_size=dataset_size,
        axis_name=axis_name,
        count=count,
        batch_size=batch_size,
    )
    if free_bits is None:
        return elbo_kl(gaussian.kl_standard_normal(mean, log_var), **kw)
    return free_bits_kl(gaussian.kl_standard_normal(mean, log_var, per_dim=True), free_bits, **kw)


def cyclical_kl_schedule(
    cycle_steps: int,
    *,
    ramp_fraction: float = 0.5,
    peak: float = 1.0,
    num_cycles: int | None = None,
) -> Schedule:
    """A cyclical KL-annealing schedule (Fu et al. 2019), usable wherever an Optax schedule is.

    Within each cycle of ``cycle_steps`` steps, β rises linearly from 0 to ``peak`` over the
    first ``ramp_fraction`` of the cycle and stays at ``peak`` for the rest:

        τ = (step mod T) / T,   β(step) = peak · min(1, τ / R),

    with T = ``cycle_steps`` and R = ``ramp_fraction``; after ``num_cycles`` cycles (if given) β
    stays at ``peak``. For a single warm-up use ``optax.linear_schedule(0.0, peak, T)`` instead.

    Reference: Fu et al. (2019), "Cyclical annealing schedule: a simple approach to mitigating
    KL vanishing", eq. 7 (there with the step counted from 1).

    Raises:
      ValueError: ``cycle_steps`` < 1, ``ramp_fraction`` outside (0, 1], ``num_cycles`` < 1.

    Examples:
      >>> import kldiv
      >>> schedule = kldiv.cyclical_kl_schedule(100, ramp_fraction=0.5, num_cycles=2)
      >>> print([f"{schedule(step):.2f}" for step in (0, 25, 50, 99, 100, 125, 200, 225)])
      ['0.00', '0.50', '1.00', '1.00', '0.00', '0.50', '1.00', '1.00']
    """
    if not isinstance(cycle_steps, numbers.Integral) or cycle_steps < 1:
        raise ValueError(f"kldiv: `cycle_steps` must be a positive int; got {cycle_steps!r}.")
    if not 0 < ramp_fraction <= 1:
        raise ValueError(f"kldiv: `ramp_fraction` must be in (0, 1]; got {ramp_fraction}.")
    if num_cycles is not None and (not isinstance(num_cycles, numbers.Integral) or num_cycles < 1):
        raise ValueError(f"kldiv: `num_cycles` must be a positive int; got {num_cycles!r}.")

    def schedule(step: ArrayLike) -> jax.Array:
        step = jnp.asarray(step)
        tau = jnp.mod(step, cycle_steps) / cycle_steps
        beta = peak * jnp.minimum(1.0, tau / ramp_fraction)
        if num_cycles is not None:
            beta = jnp.where(step >= num_cycles * cycle_steps, peak, beta)
        return beta

    return schedule
