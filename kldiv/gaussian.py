"""Closed-form KL divergences between multivariate Gaussians, in every parameterisation users hold.

Argument order is the mathematical one: every function returns KL(p‖q) with p = N(μ_p, Σ_p) the
distribution the expectation is taken under (in a VAE: the encoder's posterior q_φ(z|x)) and q the
second distribution (the prior p(z)):

    KL(p‖q) = ½ [ tr(Σ_q⁻¹ Σ_p) − D + log|Σ_q| − log|Σ_p| + (μ_p − μ_q)ᵀ Σ_q⁻¹ (μ_p − μ_q) ].

Every function **sums over the last (event, latent) axis and never averages over it**: the KL of a
D-dimensional Gaussian is the sum of D per-dimension contributions, so a mean over latent
dimensions would silently divide the KL by D. Batch axes are kept (one value per example) and
broadcast between p and q, so a batch of posteriors ``[B, D]`` against one prior given as ``[D]``
(or ``[D, D]``) works. Aggregating over examples is a separate, explicit step: an ELBO needs
:func:`kldiv.reduce` with ``"mean"`` (per-example objective), ``"sum"`` or ``"dataset"`` (N/M ×
minibatch sum, the whole-dataset ELBO of Kingma & Welling 2014, eq. 8/10); see :mod:`kldiv.vae`.

How it is computed. With r_i = log(σ²_p,i / σ²_q,i) and z_i the mean difference whitened by q, the
diagonal KL is Σ_i ½[(e^{r_i} − 1 − r_i) + z_i²]. Both parts are non-negative and
e^r − 1 − r = ω(−r) (see ``kldiv._numerics``) is evaluated from its Taylor series near r = 0, so
identical distributions give exactly 0, tiny KLs keep their relative accuracy in float32 and
the result is never negative (the textbook ½[μ² + e^{lv} − 1 − lv] cancels to noise and can go
negative there). Full covariances use the same split through the Cholesky factors
(:func:`kl_full`): the result is a sum of non-negative terms, one per latent dimension.

Parameterisations (pick the one your network outputs; all share one core):

========================================  =======================================================
:func:`kl_standard_normal`                N(μ, diag e^{log_var}) ‖ N(0, I)
:func:`kl_standard_normal_scale`          N(μ, diag σ²) ‖ N(0, I),      σ = ``scale`` > 0
:func:`kl_standard_normal_log_scale`      N(μ, diag e^{2 log σ}) ‖ N(0, I)
:func:`kl_diag`                           two diagonal Gaussians by log-variance
:func:`kl_diag_scale`                     two diagonal Gaussians by standard deviation
:func:`kl_diag_log_scale`                 two diagonal Gaussians by log standard deviation
:func:`kl_full`                           full covariances Σ = L Lᵀ by lower Cholesky factors L
:func:`kl_lowrank`                        covariances Σ = diag(d) + U Uᵀ (diagonal plus low rank)
========================================  =======================================================

The diagonal and full-covariance functions take ``per_dim=True`` to return the D per-dimension
terms (shape ``[..., D]``, non-negative, summing to the KL) for "free bits" (Kingma et al. 2016)
and per-dimension diagnostics; see :func:`kldiv.vae.free_bits_kl`.

dtypes: bfloat16/float16 inputs are computed and returned in float32; float32 stays float32;
float64 stays float64 (with ``jax_enable_x64``). Non-floating inputs raise TypeError; shapes that
do not describe one D-dimensional Gaussian raise ValueError naming every shape.

References: Kullback & Leibler (1951); Kingma & Welling (2014), "Auto-encoding variational Bayes",
appendix B (the standard-normal term); Kingma et al. (2016), "Improved variational inference with
inverse autoregressive flow" (free bits).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero
from jax.scipy.linalg import solve_triangular
from jax.typing import ArrayLike

from kldiv import _checks
from kldiv._numerics import exp_excess, log_ratio

__all__ = [
    "kl_diag",
    "kl_diag_log_scale",
    "kl_diag_scale",
    "kl_full",
    "kl_lowrank",
    "kl_standard_normal",
    "kl_standard_normal_log_scale",
    "kl_standard_normal_scale",
]

_HIGHEST = jax.lax.Precision.HIGHEST
_UNROLL_MAX = 16  # Householder QR: unroll the column loop up to this rank

# ---------------------------------------------------------------------------------------------
# Elementwise numerics.


def _diag_terms(r: jax.Array, z: jax.Array) -> jax.Array:
    """Twice the per-dimension KL: (e^r − 1 − r) + z², r = log(σ²_p/σ²_q), z = (μ_p − μ_q)/σ_q."""
    return exp_excess(r) + z * z


# ---------------------------------------------------------------------------------------------
# Shape and dtype checks for Gaussian parameters.

_VECTOR, _MATRIX, _FACTOR = "[..., D]", "[..., D, D]", "[..., D, K]"


def _check_gaussian(*specs: tuple[str, ArrayLike, str]) -> tuple[list[jax.Array], tuple[int, ...]]:
    """Checks (name, array, layout) triples describing one D-dimensional Gaussian pair.

    Every array must be floating (TypeError), have the event axes its layout names, square
    matrices, one event size D across all arguments, and batch axes (those before the event axes)
    that broadcast (ValueError naming every shape). Returns the arrays cast to the common compute
    dtype (not broadcast) and the broadcast batch shape.
    """
    for name, x, _ in specs:
        _checks.check_floating(name, x)
    arrays = [jnp.asarray(x) for _, x, _ in specs]
    dtype = _checks.compute_dtype(*arrays)
    described = ", ".join(
        f"`{n}` {tuple(a.shape)}" for (n, _, _), a in zip(specs, arrays, strict=True)
    )
    sizes, batch_shapes = [], []
    for (name, _, layout), a in zip(specs, arrays, strict=True):
        event_ndim = 1 if layout == _VECTOR else 2
        if a.ndim < event_ndim:
            raise ValueError(
                f"kldiv: `{name}` must have shape {layout}; got shape {tuple(a.shape)} "
                f"(arguments: {described})."
            )
        if layout == _MATRIX and a.shape[-1] != a.shape[-2]:
            raise ValueError(
                f"kldiv: `{name}` must be square lower-triangular with shape {layout}; got shape "
                f"{tuple(a.shape)} (arguments: {described})."
            )
        sizes.append(a.shape[-1] if layout != _FACTOR else a.shape[-2])
        batch_shapes.append(a.shape[: a.ndim - event_ndim])
    if len(set(sizes)) > 1:
        raise ValueError(
            f"kldiv: event sizes differ: {described} give event sizes "
            f"{', '.join(map(str, sizes))}; every argument must describe the same D-dimensional "
            "Gaussian (means and diagonals [..., D], scale_tril [..., D, D], factors [..., D, K])."
        )
    try:
        batch = _checks.broadcast_shapes([n for n, _, _ in specs], batch_shapes)
    except ValueError as err:
        raise ValueError(
            f"{err} These are the batch axes (before the event axes) of {described}."
        ) from None
    return [a.astype(dtype) for a in arrays], batch


def _finish(twice_terms: jax.Array, batch: tuple[int, ...], per_dim: bool) -> jax.Array:
    """½ × the per-dimension terms (``per_dim``) or ½ × their sum over the event axis.

    The ½ is applied after the sum: a scalar factor inside the summand makes XLA's CPU backend
    materialise it as a full-size array next to its fused reduction.
    """
    twice_terms = jnp.broadcast_to(twice_terms, (*batch, twice_terms.shape[-1]))
    if per_dim:
        return 0.5 * twice_terms
    return 0.5 * jnp.sum(twice_terms, axis=-1)


def _all_equal(x: jax.Array, y: jax.Array, event_ndim: int) -> jax.Array:
    """Per-example (broadcast) test that two parameter arrays are equal on their event axes."""
    axes = tuple(range(-event_ndim, 0))
    return jnp.all(x == y, axis=axes)


# ---------------------------------------------------------------------------------------------
# Triangular solves: once per prior when the factor has no batch axes.


def _drop_unit_batch(l: jax.Array) -> jax.Array:
    """A factor whose batch axes are all 1 is a shared factor: view it as a single matrix."""
    if l.ndim > 2 and all(s == 1 for s in l.shape[:-2]):
        return l.reshape(l.shape[-2:])
    return l


@jax.custom_jvp
def _tri_solve(l: jax.Array, b: jax.Array) -> jax.Array:
    """L⁻¹B for lower-triangular L (upper triangle ignored), same batch axes or none.

    The tangent is the closed form L⁻¹(dB − tril(dL)·Y), so reverse mode needs one more solve
    (with Lᵀ) and one matrix product: two triangular solves in all, run one after the other.
    (Differentiating ``solve_triangular`` directly adds a third, independent one; on CPU two
    batched LAPACK solves in flight at once can deadlock jaxlib's shared thread pool.)
    """
    return solve_triangular(l, b, lower=True)


def _tri_solve_jvp(primals, tangents):
    l, b = primals
    dl, db = tangents
    y = _tri_solve(l, b)
    rhs = jnp.zeros_like(y) if isinstance(db, SymbolicZero) else db
    if not isinstance(dl, SymbolicZero):
        rhs = rhs - jnp.matmul(jnp.tril(dl), y, precision=_HIGHEST)
    return y, solve_triangular(l, rhs, lower=True)


_tri_solve.defjvp(_tri_solve_jvp, symbolic_zeros=True)


def _solve_sq_rows(l: jax.Array, x: jax.Array, n_strict: int = 0) -> jax.Array:
    """Row sums of squares of M = L⁻¹X: Σ_j M_ij², over j < i only for the first ``n_strict``
    columns (the strict lower triangle of a square block) and over every other column.

    ``l``: lower-triangular ``[..., d, d]``; ``x``: ``[..., d, n]``; returns ``[..., d]`` for the
    broadcast batch shape. When ``l`` has no batch axes (a shared prior) the columns of every
    example's ``x`` are stacked into one ``[d, batch·n]`` right-hand side and solved once: a single
    level-3 triangular solve against the shared factor instead of one solve per example. The
    stacked columns are laid out so that the solve reads and writes them without further copies.
    Callers pass all their right-hand sides in one ``x``: one solve per call is cheaper, and on
    CPU two batched LAPACK solves running concurrently can deadlock jaxlib's shared thread pool.
    """
    d, n = x.shape[-2], x.shape[-1]
    if l.ndim == 2:
        batch = x.shape[:-2]
        cols_t = jnp.swapaxes(x, -1, -2).reshape(-1, d)  # row (b, j) = column j of x_b
        m_t = _tri_solve(l, cols_t.T).T.reshape(*batch, n, d)  # (L⁻¹x_b)ᵀ
        row_axis, col_axis = m_t.ndim - 1, m_t.ndim - 2
    else:
        batch = tuple(np.broadcast_shapes(l.shape[:-2], x.shape[:-2]))
        l = jnp.broadcast_to(l, (*batch, d, d))
        m_t = _tri_solve(l, jnp.broadcast_to(x, (*batch, d, n)))
        row_axis, col_axis = m_t.ndim - 2, m_t.ndim - 1
    sq = m_t * m_t
    if n_strict:
        shape = [1] * m_t.ndim
        shape[row_axis], shape[col_axis] = d, n
        i = jax.lax.broadcasted_iota(jnp.int32, shape, row_axis)
        j = jax.lax.broadcasted_iota(jnp.int32, shape, col_axis)
        sq = jnp.where((j < i) | (j >= n_strict), sq, jnp.zeros_like(sq))
    return jnp.sum(sq, axis=col_axis)


def _concat_columns(l: jax.Array, blocks: list[jax.Array]) -> jax.Array | None:
    """``blocks`` ([..., d, n_k]) side by side as one right-hand side, or None when a shared
    factor would have to be solved against copies of a block with fewer batch axes."""
    batch = tuple(np.broadcast_shapes(*(b.shape[:-2] for b in blocks)))
    if l.ndim == 2 and any(b.shape[:-2] != batch for b in blocks):
        return None
    if l.ndim > 2:
        batch = tuple(np.broadcast_shapes(batch, l.shape[:-2]))
    return jnp.concatenate([jnp.broadcast_to(b, (*batch, *b.shape[-2:])) for b in blocks], -1)


# ---------------------------------------------------------------------------------------------
# Diagonal Gaussians.


def kl_standard_normal(mean: ArrayLike, log_var: ArrayLike, *, per_dim: bool = False) -> jax.Array:
    """KL(N(μ, diag e^{log_var}) ‖ N(0, I)), summed over the last (latent) axis.

    KL = Σ_i ½ [μ_i² + e^{lv_i} − 1 − lv_i] = Σ_i ½ [μ_i² + ω(−lv_i)],  ω(x) = x + expm1(−x),

    the Gaussian term of the VAE objective (Kingma & Welling 2014, appendix B, where it appears as
    −KL). The sum runs over the D latent dimensions and is never an average over them.
    e^{lv} − 1 − lv is computed accurately (series near 0), so μ = 0, lv = 0 gives exactly 0,
    tiny KLs keep relative accuracy and no value is negative.

    Args:
      mean: μ, shape ``[..., D]``, floating.
      log_var: log σ², broadcastable against ``mean`` in the batch axes, event size D.
      per_dim: if True return the D non-negative terms ``[..., D]`` (before the sum), e.g. for
        free bits; their sum is the KL.

    Returns:
      One KL per example, shape = broadcast batch shape (float32 for 16-bit inputs, else the input
      dtype). Finite for every finite μ and any log_var in [−60, 60] in float32 (far beyond,
      e^{lv} itself overflows). Gradients: ∂/∂μ = μ, ∂/∂log_var = (e^{lv} − 1)/2 (closed forms).
      Aggregate over examples with :func:`kldiv.reduce` or :func:`kldiv.vae.elbo_kl`.

    Raises:
      TypeError: non-floating inputs. ValueError: mismatched event sizes or batch axes.

    Examples:
      >>> import jax.numpy as jnp
      >>> import numpy as np
      >>> import kldiv
      >>> mean = jnp.array([[0.0, 0.0], [0.5, -1.0]])  # a batch of two, D = 2 latents
      >>> log_var = jnp.array([[0.0, 0.0], [-0.5, 0.2]])
      >>> kl = kldiv.kl_standard_normal(mean, log_var)  # summed over the latents
      >>> print(np.asarray(kl).round(4))
      [0.    0.689]
      >>> print(f"{kldiv.reduce(kl, 'mean'):.4f}")
      0.3445
      >>> kldiv.kl_standard_normal(mean, log_var, per_dim=True).shape
      (2, 2)
    """
    (mean, log_var), batch = _check_gaussian(("mean", mean, _VECTOR), ("log_var", log_var, _VECTOR))
    return _finish(_diag_terms(log_var, mean), batch, per_dim)


def kl_standard_normal_scale(
    mean: ArrayLike, scale: ArrayLike, *, per_dim: bool = False
) -> jax.Array:
    """KL(N(μ, diag σ²) ‖ N(0, I)) from the standard deviation σ = ``scale`` > 0.

    KL = Σ_i ½ [μ_i² + σ_i² − 1 − 2 log σ_i], summed (never averaged) over the last axis, computed
    as Σ_i ½[μ_i² + ω(−2 log σ_i)] (exact 0 at μ = 0, σ = 1; never negative). σ = 0 gives +inf.
    Shapes, dtypes and ``per_dim`` as :func:`kl_standard_normal`. ∂/∂σ = σ − 1/σ.

    Examples:
      >>> import jax.numpy as jnp
      >>> import numpy as np
      >>> import kldiv
      >>> mean = jnp.array([[0.0, 0.0], [0.5, -1.0]])
      >>> scale = jnp.array([[1.0, 1.0], [0.5, 2.0]])  # standard deviations σ > 0
      >>> print(np.asarray(kldiv.kl_standard_normal_scale(mean, scale)).round(4))
      [0.   1.75]
    """
    (mean, scale), batch = _check_gaussian(("mean", mean, _VECTOR), ("scale", scale, _VECTOR))
    return _finish(_diag_terms(2 * jnp.log(scale), mean), batch, per_dim)


def kl_standard_normal_log_scale(
    mean: ArrayLike, log_scale: ArrayLike, *, per_dim: bool = False
) -> jax.Array:
    """KL(N(μ, diag e^{2 log σ}) ‖ N(0, I)) from the log standard deviation ``log_scale`` = log σ.

    KL = Σ_i ½ [μ_i² + e^{2 log σ_i} − 1 − 2 log σ_i], summed (never averaged) over the last
    axis; identical to :func:`kl_standard_normal` with log_var = 2·log_scale. Shapes, dtypes and
    ``per_dim`` as there; finite for log_scale in [−30, 30] in float32.

    Examples:
      >>> import jax.numpy as jnp
      >>> import numpy as np
      >>> import kldiv
      >>> mean = jnp.array([[0.0, 0.0], [0.5, -1.0]])
      >>> log_scale = jnp.log(jnp.array([[1.0, 1.0], [0.5, 2.0]]))  # log σ
      >>> print(np.asarray(kldiv.kl_standard_normal_log_scale(mean, log_scale)).round(4))
      [0.   1.75]
    """
    (mean, log_scale), batch = _check_gaussian(
        ("mean", mean, _VECTOR), ("log_scale", log_scale, _VECTOR)
    )
    return _finish(_diag_terms(2 * log_scale, mean), batch, per_dim)


def kl_diag(
    mean_p: ArrayLike,
    log_var_p: ArrayLike,
    mean_q: ArrayLike,
    log_var_q: ArrayLike,
    *,
    per_dim: bool = False,
) -> jax.Array:
    """KL(N(μ_p, diag e^{lv_p}) ‖ N(μ_q, diag e^{lv_q})) by log-variances, summed over latents.

    With r = lv_p − lv_q and z = (μ_p − μ_q)·e^{−lv_q/2}:

        KL = Σ_i ½ [ e^{r_i} − 1 − r_i + z_i² ]

    (the textbook ½[lv_q − lv_p + (e^{lv_p} + (μ_p − μ_q)²)/e^{lv_q} − 1], rearranged into two
    non-negative parts). e^r − 1 − r uses a series near 0, so identical distributions give exactly
    0 and tiny KLs keep relative accuracy; z is scaled before squaring, so
    (μ_p − μ_q)² / e^{lv_q} does not overflow for lv_q = −60 in float32 unless the KL itself does.
    The sum runs over the latent dimensions; it is never an average over them.

    Args:
      mean_p, log_var_p: p (e.g. the posterior), shapes ``[..., D]``.
      mean_q, log_var_q: q (e.g. the prior), ``[..., D]`` or ``[D]`` for one shared prior; batch
        axes broadcast against p's.
      per_dim: if True return the D non-negative per-dimension terms ``[..., D]``.

    Returns:
      One KL per example (broadcast batch shape); float32 for 16-bit inputs, else the input
      dtype. Finite wherever the KL is representable: in float32 for every lv_p, lv_q in
      [−60, 60] with lv_p − lv_q ≤ 88 (beyond that e^{lv_p − lv_q} > 3.4e38 is the true value's
      size). Gradients: ∂/∂μ_p = z·e^{−lv_q/2}, ∂/∂lv_p = (e^r − 1)/2,
      ∂/∂lv_q = −(e^r − 1 + z²)/2.

    Raises:
      TypeError: non-floating inputs. ValueError: mismatched event sizes or batch axes.

    Examples:
      >>> import jax.numpy as jnp
      >>> import numpy as np
      >>> import kldiv
      >>> # A batch of two posteriors p (D = 2) against one shared prior q given as [D].
      >>> mean_p = jnp.array([[0.0, 0.0], [0.5, -1.0]])
      >>> log_var_p = jnp.array([[0.0, 0.0], [-0.5, 0.2]])
      >>> mean_q, log_var_q = jnp.array([0.0, 0.5]), jnp.array([0.0, 1.0])
      >>> kl = kldiv.kl_diag(mean_p, log_var_p, mean_q, log_var_q)
      >>> print(np.asarray(kl).round(4))
      [0.2299 0.7168]
    """
    (mp, lvp, mq, lvq), batch = _check_gaussian(
        ("mean_p", mean_p, _VECTOR),
        ("log_var_p", log_var_p, _VECTOR),
        ("mean_q", mean_q, _VECTOR),
        ("log_var_q", log_var_q, _VECTOR),
    )
    z = (mp - mq) * jnp.exp(-0.5 * lvq)
    return _finish(_diag_terms(lvp - lvq, z), batch, per_dim)


def kl_diag_scale(
    mean_p: ArrayLike,
    scale_p: ArrayLike,
    mean_q: ArrayLike,
    scale_q: ArrayLike,
    *,
    per_dim: bool = False,
) -> jax.Array:
    """KL(N(μ_p, diag σ_p²) ‖ N(μ_q, diag σ_q²)) by standard deviations σ > 0.

    KL = Σ_i ½ [ e^{r_i} − 1 − r_i + ((μ_p,i − μ_q,i)/σ_q,i)² ],  r = 2 log(σ_p/σ_q),

    with log(σ_p/σ_q) formed as log1p((σ_p − σ_q)/σ_q) when the two are close, so nearly equal
    scales keep their tiny KL. Summed over the last (latent) axis, never averaged. σ_p = 0 or
    σ_q = 0 gives +inf. Shapes, dtypes, broadcasting and ``per_dim`` as :func:`kl_diag`.

    Examples:
      >>> import jax.numpy as jnp
      >>> import numpy as np
      >>> import kldiv
      >>> mean_p, scale_p = jnp.array([[0.5, -1.0]]), jnp.array([[0.5, 2.0]])
      >>> mean_q, scale_q = jnp.array([0.0, 0.5]), jnp.array([1.0, 1.5])
      >>> print(np.asarray(kldiv.kl_diag_scale(mean_p, scale_p, mean_q, scale_q)).round(4))
      [1.0444]
    """
    (mp, sp, mq, sq), batch = _check_gaussian(
        ("mean_p", mean_p, _VECTOR),
        ("scale_p", scale_p, _VECTOR),
        ("mean_q", mean_q, _VECTOR),
        ("scale_q", scale_q, _VECTOR),
    )
    r = 2 * log_ratio(sp, sq)
    delta = mp - mq
    z = jnp.where(delta == 0, jnp.zeros_like(delta), delta / sq)  # σ_q = 0: +inf, not 0/0
    return _finish(_diag_terms(r, z), batch, per_dim)


def kl_diag_log_scale(
    mean_p: ArrayLike,
    log_scale_p: ArrayLike,
    mean_q: ArrayLike,
    log_scale_q: ArrayLike,
    *,
    per_dim: bool = False,
) -> jax.Array:
    """KL(N(μ_p, diag e^{2 s_p}) ‖ N(μ_q, diag e^{2 s_q})) by log standard deviations s = log σ.

    KL = Σ_i ½ [ e^{r_i} − 1 − r_i + ((μ_p,i − μ_q,i)·e^{−s_q,i})² ],  r = 2(s_p − s_q);

    identical to :func:`kl_diag` with log-variances 2s. Summed over the last (latent) axis, never
    averaged. Shapes, dtypes, broadcasting and ``per_dim`` as :func:`kl_diag`.

    Examples:
      >>> import jax.numpy as jnp
      >>> import numpy as np
      >>> import kldiv
      >>> mean_p, log_scale_p = jnp.array([[0.5, -1.0]]), jnp.log(jnp.array([[0.5, 2.0]]))
      >>> mean_q, log_scale_q = jnp.array([0.0, 0.5]), jnp.log(jnp.array([1.0, 1.5]))
      >>> kl = kldiv.kl_diag_log_scale(mean_p, log_scale_p, mean_q, log_scale_q)
      >>> print(np.asarray(kl).round(4))
      [1.0444]
    """
    (mp, lsp, mq, lsq), batch = _check_gaussian(
        ("mean_p", mean_p, _VECTOR),
        ("log_scale_p", log_scale_p, _VECTOR),
        ("mean_q", mean_q, _VECTOR),
        ("log_scale_q", log_scale_q, _VECTOR),
    )
    z = (mp - mq) * jnp.exp(-lsq)
    return _finish(_diag_terms(2 * (lsp - lsq), z), batch, per_dim)


# ---------------------------------------------------------------------------------------------
# Full covariances by Cholesky factors.


def kl_full(
    mean_p: ArrayLike,
    scale_tril_p: ArrayLike,
    mean_q: ArrayLike,
    scale_tril_q: ArrayLike,
    *,
    per_dim: bool = False,
) -> jax.Array:
    """KL(N(μ_p, L_p L_pᵀ) ‖ N(μ_q, L_q L_qᵀ)) from lower-triangular Cholesky factors.

    With M = L_q⁻¹ L_p (lower triangular, M_ii = L_p,ii / L_q,ii), δ = L_q⁻¹(μ_p − μ_q) and
    r_i = 2 log(L_p,ii / L_q,ii):

        KL = ½ [ ‖M‖_F² − D − Σ_i r_i + ‖δ‖² ]
           = Σ_i ½ [ (e^{r_i} − 1 − r_i) + Σ_{j<i} M_ij² + δ_i² ],

    using tr(Σ_q⁻¹Σ_p) = ‖M‖_F² and log|Σ_q| − log|Σ_p| = −Σ_i r_i. The strict lower triangle of
    M is taken from M = I + L_q⁻¹(L_p − L_q), and δ and it come from triangular solves, the
    log-determinants from the log-diagonals: no explicit inverse or determinant is formed.
    Solving against the exact difference L_p − L_q means equal parameters give exactly 0 and
    nearly equal ones a small KL with relative accuracy (nothing cancels against the identity).
    The i-th term is E_p[KL(p(z_i | z_<i) ‖ q(z_i | z_<i))], the chain-rule decomposition of the KL
    along the factors' ordering; every term is non-negative, so the sum never is. The sum runs
    over the D latent dimensions and is never an average over them.

    Shared prior: when ``scale_tril_q`` has no batch axes (shape ``[D, D]``) the whole batch is
    stacked into the columns of one ``[D, B·D]`` right-hand side and solved against the prior's
    factor once, instead of once per example (about 2× faster than TensorFlow Probability on
    CPU at ``[4096, 64]``; see ``bench/suites/gaussian.py``).

    Args:
      mean_p: μ_p, shape ``[..., D]``.
      scale_tril_p: L_p, shape ``[..., D, D]``, lower triangular with non-zero (conventionally
        positive) diagonal; the strict upper triangle is ignored. Only L Lᵀ enters the KL, so
        the signs of the diagonal do not matter.
      mean_q, scale_tril_q: q's parameters, likewise; batch axes broadcast against p's (e.g.
        ``[D]`` and ``[D, D]`` for one prior shared by the whole batch).
      per_dim: if True return the D non-negative chain-rule terms ``[..., D]`` defined above.

    Returns:
      One KL per example (broadcast batch shape); float32 for 16-bit inputs, else the input dtype.
      Equal parameters (means and lower triangles) give exactly 0, not rounding noise.
      A zero on either diagonal (a singular covariance) is outside the domain.

    Raises:
      TypeError: non-floating inputs.
      ValueError: non-square factors, mismatched event sizes or batch axes (the message names
        every shape).

    Examples:
      >>> import jax.numpy as jnp
      >>> import numpy as np
      >>> import kldiv
      >>> mean_p = jnp.array([0.5, -1.0])
      >>> scale_tril_p = jnp.array([[1.0, 0.0], [0.8, 0.6]])  # Σ_p = L Lᵀ, correlated
      >>> mean_q, scale_tril_q = jnp.zeros(2), jnp.eye(2)  # N(0, I)
      >>> print(f"{kldiv.kl_full(mean_p, scale_tril_p, mean_q, scale_tril_q):.4f}")
      1.1358

      Diagonal factors give the diagonal KL:

      >>> scale_p = jnp.array([0.5, 2.0])
      >>> full = kldiv.kl_full(mean_p, jnp.diag(scale_p), mean_q, scale_tril_q)
      >>> diag = kldiv.kl_diag_scale(mean_p, scale_p, mean_q, jnp.ones(2))
      >>> print(f"{full:.4f} {diag:.4f}")
      1.7500 1.7500

    References:
      Kullback & Leibler (1951); the Frobenius-norm form of the trace as in TensorFlow
      Probability's ``MultivariateNormalLinearOperator`` KL.
    """
    (mp, lp, mq, lq), batch = _check_gaussian(
        ("mean_p", mean_p, _VECTOR),
        ("scale_tril_p", scale_tril_p, _MATRIX),
        ("mean_q", mean_q, _VECTOR),
        ("scale_tril_q", scale_tril_q, _MATRIX),
    )
    lp = jnp.tril(lp)
    lq = _drop_unit_batch(jnp.tril(lq))
    diag_p = jnp.abs(jnp.diagonal(lp, axis1=-2, axis2=-1))
    diag_q = jnp.abs(jnp.diagonal(lq, axis1=-2, axis2=-1))
    r = 2 * log_ratio(diag_p, diag_q)
    # M = L_q⁻¹L_p = I + L_q⁻¹(L_p − L_q): the strict lower triangles agree, and solving against
    # the exact difference makes equal factors give exactly 0 and nearly equal ones a tiny,
    # relatively accurate value (no cancellation against the identity).
    diff, delta = lp - lq, (mp - mq)[..., None]
    rhs = _concat_columns(lq, [diff, delta])
    if rhs is not None:  # the usual case: one solve for [L_p − L_q | μ_p − μ_q]
        solved = _solve_sq_rows(lq, rhs, n_strict=lp.shape[-1])
    else:  # shared factors, batched means: do not copy L_p − L_q per example
        solved = _solve_sq_rows(lq, diff, n_strict=lp.shape[-1]) + _solve_sq_rows(lq, delta)
    twice_terms = exp_excess(r) + solved
    return _finish(twice_terms, batch, per_dim)


# ---------------------------------------------------------------------------------------------
# Diagonal plus low-rank covariances.


def _householder(a: jax.Array, want_q: bool) -> tuple[jax.Array, jax.Array | None]:
    """Householder QR of ``a`` ``[..., m, k]`` (m ≥ k, full column rank) in plain XLA ops.

    Returns (|diag R| ``[..., k]``, the thin Q ``[..., m, k]`` or None). Backward stable in any
    precision, differentiable, batched, and free of LAPACK calls (on CPU, concurrent batched
    LAPACK calls can deadlock jaxlib's thread pool). Cost O(m·k²) per matrix.
    """
    m, k = a.shape[-2], a.shape[-1]
    row = jnp.arange(m)
    batch = a.shape[:-2]

    def reflect(u, x):  # (I − u uᵀ) x for x [..., m, n]
        return (
            x
            - u[..., :, None]
            * jnp.einsum("...m,...mn->...n", u, x, precision=_HIGHEST)[..., None, :]
        )

    def step(j, carry):
        a, us, alphas = carry
        col = jnp.take(a, j, axis=-1)
        x = jnp.where(row >= j, col, jnp.zeros_like(col))
        alpha = jnp.sqrt(jnp.sum(x * x, axis=-1))  # |R_jj| > 0 for a full-rank column
        xj = jnp.take(col, j, axis=-1)
        sign = jnp.where(xj >= 0, 1.0, -1.0).astype(a.dtype)
        v = x + jnp.where(row == j, (sign * alpha)[..., None], jnp.zeros_like(x))
        u = v * jnp.sqrt(1.0 / (alpha * (alpha + jnp.abs(xj))))[..., None]  # ‖u‖² = 2
        us = jax.lax.dynamic_update_index_in_dim(us, u, j, axis=0)
        alphas = jax.lax.dynamic_update_index_in_dim(alphas, alpha, j, axis=0)
        return reflect(u, a), us, alphas

    def loop(n, body, carry):  # unrolled for small k (fast to compile), else a scan
        if n <= _UNROLL_MAX:
            for i in range(n):
                carry = body(i, carry)
            return carry
        return jax.lax.fori_loop(0, n, body, carry)

    us = jnp.zeros((k, *batch, m), a.dtype)
    alphas = jnp.zeros((k, *batch), a.dtype)
    _, us, alphas = loop(k, step, (a, us, alphas))
    alphas = jnp.moveaxis(alphas, 0, -1)
    if not want_q:
        return alphas, None
    q = jnp.broadcast_to(jnp.eye(m, k, dtype=a.dtype), a.shape)
    q = loop(k, lambda i, q: reflect(us[k - 1 - i], q), q)
    return alphas, q


def _capacitance(u_white: jax.Array, want_q: bool) -> tuple[jax.Array, jax.Array | None]:
    """log|I + ŨᵀŨ| and (optionally) Q₁, the top D rows of the thin Q of ``[Ũ; I]``.

    With [Ũ; I] = QR: RᵀR = I + ŨᵀŨ = C (so log|C| = 2Σ log|R_ii|) and Ũ = Q₁R, hence
    L_c⁻¹ŨᵀW = Q₁ᵀW for L_c = Rᵀ: the Woodbury corrections need no triangular solve. Taking R
    from a QR factorisation instead of forming ŨᵀŨ keeps the identity from being lost to rounding
    (and a Cholesky factorisation from failing) when a row of Ũ is large (a tiny diagonal entry).
    """
    d, k = u_white.shape[-2], u_white.shape[-1]
    eye = jnp.broadcast_to(jnp.eye(k, dtype=u_white.dtype), (*u_white.shape[:-2], k, k))
    alphas, q = _householder(jnp.concatenate([u_white, eye], axis=-2), want_q)
    log_det = 2 * jnp.sum(jnp.log(alphas), axis=-1)
    return log_det, None if q is None else q[..., :d, :]


def _sq_norm(x: jax.Array) -> jax.Array:
    return jnp.sum(x * x, axis=(-2, -1))


def kl_lowrank(
    mean_p: ArrayLike,
    cov_diag_p: ArrayLike,
    cov_factor_p: ArrayLike | None,
    mean_q: ArrayLike,
    cov_diag_q: ArrayLike,
    cov_factor_q: ArrayLike | None,
) -> jax.Array:
    """KL(N(μ_p, D_p + U_p U_pᵀ) ‖ N(μ_q, D_q + U_q U_qᵀ)) for diagonal-plus-low-rank covariances.

    The covariance is Σ = diag(d) + U Uᵀ with d > 0 (``cov_diag``, variances) and U of rank K ≪ D
    (``cov_factor``), as TensorFlow Probability's ``MultivariateNormalDiagPlusLowRankCovariance``
    (``cov_diag_factor``, ``cov_perturb_factor``) and torch's ``LowRankMultivariateNormal``
    (``cov_diag``, ``cov_factor``). ``None`` for a factor means K = 0 (a diagonal Gaussian), so a
    low-rank posterior against a diagonal prior or the reverse works too.

    Computed in O(D·K²) per example, never forming a D×D matrix. In the coordinates whitened by
    q's diagonal (Ũ = D_q^{-1/2}U, z = D_q^{-1/2}(μ_p − μ_q), r = log(d_p/d_q), A = diag(e^r)),
    with the K×K capacitance matrices C_q = I + Ũ_qᵀŨ_q = L_c L_cᵀ and C_p = I + U_pᵀD_p⁻¹U_p:

      * matrix determinant lemma: log|Σ_q| − log|Σ_p| = −Σ_i r_i + log|C_q| − log|C_p|;
      * Woodbury: Σ̃_q⁻¹ = I − Ũ_q C_q⁻¹ Ũ_qᵀ, so
        tr(Σ_q⁻¹Σ_p) = Σ_i e^{r_i} + ‖Ũ_p‖_F² − ‖L_c⁻¹Ũ_qᵀA^{1/2}‖_F² − ‖L_c⁻¹Ũ_qᵀŨ_p‖_F² and
        (μ_p − μ_q)ᵀΣ_q⁻¹(μ_p − μ_q) = ‖z‖² − ‖L_c⁻¹Ũ_qᵀz‖²;

    KL = ½[Σ_i (e^{r_i} − 1 − r_i + z_i²) + ‖Ũ_p‖_F² − ‖L_c⁻¹Ũ_qᵀA^{1/2}‖_F²
    − ‖L_c⁻¹Ũ_qᵀŨ_p‖_F² − ‖L_c⁻¹Ũ_qᵀz‖² + log|C_q| − log|C_p|], clamped at 0.

    The capacitance factor comes from a Householder QR of the stacked ``[Ũ; I]`` = QR (RᵀR = C,
    L_c = Rᵀ) rather than a Cholesky factorisation of a formed ŨᵀŨ + I, which loses the identity
    to rounding when the diagonal is tiny next to the factor; and since Ũ_q = Q₁R (Q₁ the top D
    rows of Q), every L_c⁻¹Ũ_qᵀW above is simply Q₁ᵀW — no triangular solve is needed. The
    diagonal part is accurate to the last bits (as :func:`kl_diag`); the low-rank corrections are
    accurate relative to their own size, ε·(‖Ũ_p‖_F² + Σ_i e^{r_i}), so in float32 a KL much
    smaller than that (a diagonal far smaller than U Uᵀ) can come out as rounding noise — never
    negative, never NaN; use float64 there. Equal parameters give exactly 0. The KL sums over the
    D latent dimensions (no per-dimension decomposition exists without a D×D factorisation).

    Args:
      mean_p, cov_diag_p: ``[..., D]`` (cov_diag > 0).
      cov_factor_p: ``[..., D, K_p]`` or None.
      mean_q, cov_diag_q, cov_factor_q: likewise for q (K_q may differ from K_p). A prior without
        batch axes has its capacitance factored once, not per example.

    Returns:
      One KL per example (broadcast batch shape); float32 for 16-bit inputs, else the input dtype.

    Raises:
      TypeError: non-floating inputs. ValueError: mismatched event sizes or batch axes.

    Examples:
      >>> import jax.numpy as jnp
      >>> import numpy as np
      >>> import kldiv
      >>> # D = 3 latents; p has a rank-1 factor, q is a diagonal Gaussian (factor None).
      >>> mean_p, cov_diag_p = jnp.array([0.5, 0.0, -0.5]), jnp.array([1.0, 0.5, 2.0])
      >>> cov_factor_p = jnp.array([[1.0], [0.5], [0.0]])  # [D, K], K = 1
      >>> mean_q, cov_diag_q = jnp.zeros(3), jnp.ones(3)
      >>> kl = kldiv.kl_lowrank(mean_p, cov_diag_p, cov_factor_p, mean_q, cov_diag_q, None)
      >>> print(f"{kl:.4f}")
      0.6669

      The same KL as :func:`kl_full` with Σ = diag(d) + U Uᵀ factored by Cholesky:

      >>> cov_p = jnp.diag(cov_diag_p) + cov_factor_p @ cov_factor_p.T
      >>> full = kldiv.kl_full(mean_p, jnp.linalg.cholesky(cov_p), mean_q, jnp.eye(3))
      >>> print(f"{full:.4f}")
      0.6669

    References:
      Woodbury (1950); Harville (1997), "Matrix algebra from a statistician's perspective",
      Thm. 18.1.1 (determinant lemma); Golub & Van Loan (2013), §5.2 (Householder QR).
    """
    specs = [("mean_p", mean_p, _VECTOR), ("cov_diag_p", cov_diag_p, _VECTOR)]
    if cov_factor_p is not None:
        specs.append(("cov_factor_p", cov_factor_p, _FACTOR))
    specs += [("mean_q", mean_q, _VECTOR), ("cov_diag_q", cov_diag_q, _VECTOR)]
    if cov_factor_q is not None:
        specs.append(("cov_factor_q", cov_factor_q, _FACTOR))
    arrays, batch = _check_gaussian(*specs)
    it = iter(arrays)
    mp, dp = next(it), next(it)
    up = next(it) if cov_factor_p is not None else None
    mq, dq = next(it), next(it)
    uq = next(it) if cov_factor_q is not None else None
    up = None if up is not None and up.shape[-1] == 0 else up
    uq = None if uq is not None and uq.shape[-1] == 0 else uq

    r = log_ratio(dp, dq)
    w = jax.lax.rsqrt(dq)  # whitening by q's diagonal
    z = (mp - mq) * w
    total = jnp.sum(exp_excess(r) + z * z, axis=-1)
    up_white = None if up is None else up * w[..., None]
    if up is not None and up_white is not None:
        log_det_p, _ = _capacitance(up * jax.lax.rsqrt(dp)[..., None], want_q=False)
        total = total + _sq_norm(up_white) - log_det_p
    if uq is not None:
        log_det_q, q1 = _capacitance(uq * w[..., None], want_q=True)
        assert q1 is not None
        a = jnp.exp(r)  # d_p / d_q
        proj_z = jnp.einsum("...dk,...d->...k", q1, z, precision=_HIGHEST)
        total = total + log_det_q - jnp.sum(a[..., None] * q1 * q1, axis=(-2, -1))
        total = total - jnp.sum(proj_z * proj_z, axis=-1)
        if up_white is not None:
            total = total - _sq_norm(
                jnp.einsum("...dk,...dl->...kl", q1, up_white, precision=_HIGHEST)
            )
    kl = 0.5 * jnp.maximum(total, 0)

    same = _all_equal(mp, mq, 1) & _all_equal(dp, dq, 1)
    if up is None or uq is None:
        if (up is None) != (uq is None):
            same = jnp.zeros_like(same)
    elif up.shape[-1] != uq.shape[-1]:
        same = jnp.zeros_like(same)
    else:
        same = same & _all_equal(up, uq, 2)
    kl = jnp.where(same, jnp.zeros_like(kl), kl)
    return jnp.broadcast_to(kl, batch)
