"""Discrete KL divergence from probabilities, log-probabilities or logits (reference semantics).

Argument order is the mathematical one: ``p`` is the reference/target distribution, ``q`` the
model/approximation, and every function returns KL(p‖q) = Σ_v p_v log(p_v/q_v) along ``axis``, with
that axis removed (one value per example; aggregate with :func:`kldiv.reduce`).

How it is computed. Each entry contributes p·log(p/q) − p + q = p·ω(log(p/q)) ≥ 0 (see
``kldiv._numerics``); for normalised p and q the extra −p + q terms sum to zero, so the sum is KL
exactly, while every term stays non-negative. That is what keeps float32 accurate when p ≈ q,
where the textbook Σ p(log p − log q) cancels catastrophically and can go negative. For
probability and log-probability inputs that do not sum to one the result is the generalised
(I-)divergence Σ [p log(p/q) − p + q] (Csiszár 1991), which differs from Σ p log(p/q) by
Σ(q − p); use :func:`kldiv.validate_probs` to check inputs at run time.

Edge semantics (all three input spaces): an entry with p = 0 contributes 0 to KL, also where
q = 0 or log q = −inf; p > 0 where q = 0 gives +inf, never NaN. Gradients are finite wherever the
value is finite: they come from closed forms (custom JVP), never from differentiating through
masked or infinite intermediates.

dtypes: bfloat16/float16 inputs are computed and returned in float32; float32 stays float32;
float64 stays float64 (with ``jax_enable_x64``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from kldiv import _checks
from kldiv._checks import PairOption
from kldiv._logits import (
    NO_TRANSFORMS,
    Transforms,
    align_pair,
    fill_masked,
    kl_logits_aligned,
    kl_logits_core,
    prepare_pair,
    static_temperature,
    temper_and_mask_pair,
    tempered_pair,
)
from kldiv._numerics import kl_terms, log_ratio, saturate
from kldiv.fused.chunked import kl_logits_chunked

__all__ = ["LOGIT_IMPLS", "choose_logits_impl", "kl", "kl_from_log_probs", "kl_from_logits"]

# Implementations of kl_from_logits, all with the same semantics and tests: "xla" (plain ops,
# closed-form JVP), "chunked" (row chunks, custom VJP saving only inputs and row statistics),
# "pallas" (Triton kernel on GPU, Pallas interpret mode elsewhere: slow, for tests); "auto" picks
# per backend and size (kldiv.fused.choose_logits_impl).
LOGIT_IMPLS: tuple[str, ...] = ("auto", "xla", "chunked", "pallas")


# ---------------------------------------------------------------------------------------------
# Cores along the last axis. Each is a custom_jvp: the value is the accurate sum of non-negative
# terms, the tangent a closed form that is finite wherever the value is.


@jax.custom_jvp
def _kl_probs_core(p, q):
    return jnp.sum(kl_terms(p, q, log_ratio(p, q)), axis=-1)


@_kl_probs_core.defjvp
def _kl_probs_jvp(primals, tangents):
    p, q = primals
    dp, dq = tangents
    x = log_ratio(p, q)
    out = jnp.sum(kl_terms(p, q, x), axis=-1)
    # d/dp = log(p/q) (0 at p = 0, the gradient of the 0·log 0 = 0 convention); d/dq = 1 − p/q.
    gp = saturate(jnp.where(p > 0, jnp.where(p > 0, x, 0), 0))
    q_safe = jnp.where(q > 0, q, 1)
    gq = saturate(jnp.where(q > 0, 1 - p / q_safe, jnp.where(p > 0, -jnp.inf, 1)))
    return out, jnp.sum(gp * dp + gq * dq, axis=-1)


@jax.custom_jvp
def _kl_log_probs_core(lp, lq):
    x, p, q = _log_space_terms(lp, lq)
    return jnp.sum(kl_terms(p, q, x), axis=-1)


def _log_space_terms(lp, lq):
    both_neg_inf = (lp == -jnp.inf) & (lq == -jnp.inf)
    x = jnp.where(both_neg_inf, jnp.zeros_like(lp), lp - lq)
    return x, jnp.exp(lp), jnp.exp(lq)


@_kl_log_probs_core.defjvp
def _kl_log_probs_jvp(primals, tangents):
    lp, lq = primals
    dlp, dlq = tangents
    x, p, q = _log_space_terms(lp, lq)
    out = jnp.sum(kl_terms(p, q, x), axis=-1)
    # d/dlog p = p·log(p/q), d/dlog q = q − p.
    glp = saturate(jnp.where(p > 0, p * jnp.where(p > 0, x, 0), 0))
    return out, jnp.sum(glp * dlp + (q - p) * dlq, axis=-1)


# ---------------------------------------------------------------------------------------------
# Public API.


def kl(p: ArrayLike, q: ArrayLike, *, axis: int = -1, where: ArrayLike | None = None) -> jax.Array:
    """KL(p‖q) from probabilities, along ``axis``.

    KL(p‖q) = Σ_v p_v log(p_v / q_v), computed as Σ_v [p_v log(p_v/q_v) − p_v + q_v] (equal for
    normalised inputs, non-negative term by term, accurate when p ≈ q; see the module docstring).

    Args:
      p: reference/target probabilities, shape ``[..., V, ...]``, any floating dtype.
      q: model probabilities, broadcastable against ``p`` (e.g. one prior row against a batch).
      axis: the event axis (summed over and removed).
      where: optional boolean mask broadcastable to the inputs; entries where it is False are left
        out of the sum (whatever they hold, NaN included, touches neither value nor gradient).

    Returns:
      KL per example: the broadcast shape without ``axis``; float32 for 16-bit inputs, else the
      input dtype. p = 0 entries contribute 0 (also where q = 0); p > 0 with q = 0 gives +inf.
      The gradient w.r.t. q is 1 − p/q (the +1 is projected out by any normalisation such as a
      softmax); w.r.t. p it is log(p/q), taken as 0 at p = 0, where the one-sided derivative is −∞.

    Raises:
      TypeError: non-floating inputs or a non-boolean ``where``.
      ValueError: shapes that do not broadcast; ``axis`` out of range.

    Examples:
      >>> import jax.numpy as jnp
      >>> import numpy as np
      >>> import kldiv
      >>> p = jnp.array([0.5, 0.5])  # reference / target
      >>> q = jnp.array([0.25, 0.75])  # model
      >>> print(f"{kldiv.kl(p, q):.4f}")
      0.1438

      One value per example (the event axis is summed away); aggregate explicitly:

      >>> p = jnp.array([[0.5, 0.5], [0.9, 0.1]])
      >>> q = jnp.array([[0.25, 0.75], [0.9, 0.1]])
      >>> values = kldiv.kl(p, q)
      >>> values.shape
      (2,)
      >>> print(np.asarray(values).round(4))
      [0.1438 0.    ]
      >>> print(f"{kldiv.reduce(values, 'mean'):.4f}")
      0.0719

    References:
      Kullback & Leibler (1951); Csiszár (1991), "Why least squares and maximum entropy?", for
      the generalised form.
    """
    p, q, where = prepare_pair("p", p, "q", q, axis, where)
    return _kl_probs_masked(p, q, where)


def kl_from_log_probs(
    log_p: ArrayLike, log_q: ArrayLike, *, axis: int = -1, where: ArrayLike | None = None
) -> jax.Array:
    """KL(p‖q) from log-probabilities, along ``axis``.

    KL(p‖q) = Σ_v e^{log p_v} (log p_v − log q_v), computed as the non-negative sum of
    p·ω(log p − log q) with ω(x) = x + expm1(−x) (see the module docstring).

    Args:
      log_p: reference/target log-probabilities (−inf allowed), shape ``[..., V, ...]``.
      log_q: model log-probabilities, broadcastable against ``log_p``.
      axis: the event axis (summed over and removed).
      where: optional boolean mask; excluded entries are left out of the sum and touch neither
        value nor gradient.

    Returns:
      KL per example (float32 for 16-bit inputs, else the input dtype). log p = −inf entries
      contribute 0 (also where log q = −inf); finite log p with log q = −inf gives +inf.
      Gradients: d/dlog_q = q − p and d/dlog_p = p·(log p − log q), finite wherever the value is.
      (torch's ``kl_div`` gives −p for the first; the two agree after any log-softmax.)

    Raises:
      TypeError: non-floating inputs or a non-boolean ``where``.
      ValueError: shapes that do not broadcast; ``axis`` out of range.

    Examples:
      >>> import jax.numpy as jnp
      >>> import kldiv
      >>> log_p = jnp.log(jnp.array([0.5, 0.5]))  # reference / target
      >>> log_q = jnp.log(jnp.array([0.25, 0.75]))  # model
      >>> print(f"{kldiv.kl_from_log_probs(log_p, log_q):.4f}")
      0.1438

      An entry with log p = −inf contributes 0:

      >>> log_p = jnp.array([0.0, -jnp.inf])
      >>> print(f"{kldiv.kl_from_log_probs(log_p, log_q):.4f}")
      1.3863

    References:
      Kullback & Leibler (1951).
    """
    lp, lq, where = prepare_pair("log_p", log_p, "log_q", log_q, axis, where)
    return _kl_log_probs_masked(lp, lq, where)


# One compiled program per shape and dtype for eager calls (instead of one per operation); inside
# a caller's jit they are inlined. Masked entries count as p = 0 (log p = −inf) in both inputs.
@jax.jit
def _kl_probs_masked(p, q, where):
    return _kl_probs_core(*fill_masked(p, q, where, 0.0))


@jax.jit
def _kl_log_probs_masked(lp, lq, where):
    return _kl_log_probs_core(*fill_masked(lp, lq, where, -jnp.inf))


def kl_from_logits(
    logits_p: ArrayLike,
    logits_q: ArrayLike,
    *,
    axis: int = -1,
    where: ArrayLike | None = None,
    temperature: float | ArrayLike = 1.0,
    impl: str = "auto",
    axis_name: str | tuple[str, ...] | None = None,
    softcap: PairOption = None,
    logit_scale: PairOption = None,
) -> jax.Array:
    """KL(softmax(logits_p / T) ‖ softmax(logits_q / T)), along ``axis``.

    With a = logits_p/T, b = logits_q/T, p = softmax(a), q = softmax(b) and x = log p − log q:

        KL(p‖q) = Σ_v p_v x_v = Σ_v p_v ω(x_v),   ω(x) = x + expm1(−x) ≥ 0,

    where x_v = (a_v − max a) − (b_v − max b) − log(Σe^{a−max a} / Σe^{b−max b}) is formed from
    error-free centred differences and a log1p of the normaliser ratio. Every term is
    non-negative, so the result is never negative and keeps float32 relative accuracy when p ≈ q
    (the textbook Σ p(log p − log q) loses every digit there).

    Args:
      logits_p: reference/target (teacher) logits, shape ``[..., V, ...]``; −inf masks an entry.
      logits_q: model (student) logits, broadcastable against ``logits_p``.
      axis: the event (vocabulary) axis, summed over and removed.
      where: optional boolean mask; excluded entries are left out of both normalisers and the
        sum, exactly as if both logits were −inf, and whatever they hold (NaN, ±inf) touches
        neither value nor gradient.
      temperature: T > 0; logits are divided by it before normalisation, after centring each row
        on its maximum (so every intermediate stays finite). A Python number, a scalar array or
        one value per example (shape ``[...]``, the inputs' shape without ``axis``: annealed or
        per-example temperatures). Concrete values must be finite and at least the compute
        dtype's smallest normal number (ValueError); traced values are used as given (check
        them with ``checkify`` if they can be ≤ 0). No T² factor is applied.
      impl: which implementation computes it; every one has the semantics above and passes the
        same tests. ``"xla"``: plain XLA ops with a closed-form JVP (supports forward mode).
        ``"chunked"``: rows in cache-sized chunks, custom VJP saving only the inputs and per-row
        statistics (O(N) extra memory). ``"pallas"``: a Triton kernel on GPU; elsewhere Pallas
        interpret mode (slow, for tests). Both are reverse-mode only. ``"auto"`` (default)
        picks only implementations verified on the backend: ``"chunked"`` for large inputs on
        CPU, else ``"xla"`` (:func:`kldiv.discrete.choose_logits_impl`); use ``"xla"`` for
        forward-mode derivatives.
        The chunked and Pallas paths keep the inputs in their storage dtype (e.g. bfloat16) and
        cast them to the compute dtype, divide by a Python-number temperature and apply
        ``where`` per row chunk / vocabulary block, so they hold no ``[N, V]`` float32 copy of
        the inputs; their gradients come back in the inputs' dtypes (computed in float32 for
        16-bit inputs). A temperature given as an array (traced, e.g. an annealing schedule) is
        instead applied to the whole inputs first (one ``[N, V]`` copy of each in the compute
        dtype), so that its own gradient is exact.
      axis_name: tensor-parallel logits: inside ``shard_map`` with the event (vocabulary) axis
        split over this mapped axis, each shard passes its slice of both logits; the row maxima,
        normalisers and the sum are combined across shards (``pmax``/``psum``), so every shard
        returns the global KL and gradients equal the unsharded computation. Uses ``"xla"``.
      softcap: c > 0, the soft-cap of Gemma-style heads, or None (off, the default). Applied
        before the temperature, after ``logit_scale``: logits ← c·tanh(s·x/c), then ÷T. A
        Python number applies to both logits; a ``(teacher, student)`` pair of Python numbers
        or None gives each side its own (e.g. ``(30.0, None)``: only the teacher caps). −inf
        logits stay −inf (an impossible token keeps probability 0; c·tanh(−inf) = −c would give
        it mass), NaN stays NaN, finite logits of any size give finite values (tanh saturates).
        Gradients carry the chain-rule factor s·(1 − tanh²(s·x/c)), 0 where tanh saturates.
      logit_scale: s > 0, a multiplier of the logits applied first (logits ← s·x), or None
        (off); a Python number or a ``(teacher, student)`` pair as for ``softcap``. Without a
        soft-cap, s·x beyond the dtype's range is saturated to its largest finite value.
        Both are static (Python numbers): the chunked path applies them per row chunk, the
        Pallas kernel per loaded block (no ``[N, V]`` copy).

    Returns:
      KL per example (float32 for 16-bit inputs, else the input dtype). Entries with p = 0
      contribute 0 (also where both logits are −inf); p > 0 where q = 0 gives +inf. A row with no
      entries left gives 0, and so does a row where p has no support (every logit of
      ``logits_p`` −inf): there is no reference distribution to match, exactly as if the row
      were masked; its gradients are 0. An empty event axis gives 0. NaN in an entry that is not
      masked gives NaN for its row, on every ``impl``. Finite logits of any size (up to ±3e38 in
      float32) give finite values whenever the KL itself is representable. Gradients:
      d/dlogits_q = (softmax(b) − softmax(a))/T and d/dlogits_p = p·(x − KL)/T, finite wherever
      the value is.

    Raises:
      TypeError: non-floating inputs (Python lists of floats are accepted), a non-boolean
        ``where``, a boolean or string ``temperature``.
      ValueError: shapes that do not broadcast; ``axis`` out of range; a concrete temperature
        that is not finite and positive, or an array temperature that is not one per example;
        a ``softcap`` or ``logit_scale`` that is not a finite positive number (TypeError for
        arrays: they are static).

    Examples:
      >>> import jax.numpy as jnp
      >>> import numpy as np
      >>> import kldiv
      >>> teacher = jnp.array([[2.0, 1.0, 0.1], [0.5, 0.5, 0.5]])
      >>> student = jnp.array([[1.5, 1.5, 0.0], [1.0, 0.0, 0.0]])
      >>> values = kldiv.kl_from_logits(teacher, student)  # KL(teacher ‖ student) per row
      >>> print(np.asarray(values).round(4))
      [0.1    0.1195]
      >>> soft = kldiv.kl_from_logits(teacher, student, temperature=2.0)
      >>> print(f"{kldiv.reduce(soft, 'mean'):.4f}")
      0.0268

      ``where`` leaves vocabulary entries out of both softmaxes:

      >>> keep = jnp.array([True, True, False])
      >>> masked = kldiv.kl_from_logits(teacher, student, where=keep)
      >>> print(np.asarray(masked).round(4))
      [0.1109 0.1201]

      Soft-capped heads (Gemma-style, c·tanh(x/c)): the same as capping the logits first.

      >>> big_teacher, big_student = 20 * teacher, 20 * student
      >>> capped = kldiv.kl_from_logits(big_teacher, big_student, softcap=30.0)
      >>> print(np.asarray(capped).round(4))
      [ 0.6914 10.557 ]
      >>> first = kldiv.kl_from_logits(
      ...     30 * jnp.tanh(big_teacher / 30), 30 * jnp.tanh(big_student / 30)
      ... )
      >>> print(np.asarray(first).round(4))
      [ 0.6914 10.557 ]

    References:
      Kullback & Leibler (1951); Hinton et al. (2015), "Distilling the knowledge in a neural
      network", for temperature.
    """
    _checks.check_choice("impl", impl, LOGIT_IMPLS)
    if axis_name is not None and impl not in ("xla", "auto"):
        raise ValueError(
            f"kldiv: axis_name (tensor-parallel vocabulary) needs impl='xla'; got {impl!r}."
        )
    a, b, where = align_pair("logits_p", logits_p, "logits_q", logits_q, axis, where)
    dtype = _checks.compute_dtype(a, b)
    temperature = _checks.check_temperature(temperature, a.shape[:-1], dtype)
    transforms = _checks.logit_transforms(logit_scale, softcap, dtype)
    if axis_name is not None:
        return kl_logits_core(
            *tempered_pair(a, b, temperature, where, axis_name, transforms), axis_name
        )
    return _kl_from_aligned_logits(
        a, b, impl, where=where, temperature=temperature, transforms=transforms
    )


# ---------------------------------------------------------------------------------------------
# Dispatch over the implementations of kl_from_logits (impl=).

# "auto" uses the chunked path on CPU from this many logits per input (N·V) on; below it the
# plain XLA path, which also supports forward-mode differentiation. Measured on a 2-core x86 CPU
# (bench/suites/fused.py, case "crossover", forward+backward): chunked is ~10% faster at 2^16
# logits, 1.3-1.9× at 2^18-2^20 and 2-4× from 2^22 on, where the XLA path's [N, V]
# intermediates leave the cache.
AUTO_CHUNKED_MIN_ELEMENTS = 2**18

# Backends on which "auto" may pick each fused implementation: only those verified there by a
# command in the repository (the CPU suite; `make gpu-check` on GPU). The Pallas kernel has not
# yet passed `make gpu-check` on GPU hardware, and the chunked path has not been measured on GPU
# or TPU, so "auto" uses the XLA path there.
AUTO_VERIFIED: dict[str, tuple[str, ...]] = {"cpu": ("chunked",)}


def choose_logits_impl(shape: tuple[int, ...], dtype=None, backend: str | None = None) -> str:
    """The implementation ``impl="auto"`` picks for aligned logits of ``shape``.

    Only implementations verified on the backend (``AUTO_VERIFIED``) are candidates: on CPU
    ``"chunked"`` when N·V ≥ ``AUTO_CHUNKED_MIN_ELEMENTS``, else ``"xla"``; on GPU and TPU
    ``"xla"`` until the fused paths pass their checks there (the README's implementation table
    says which). ``backend`` defaults to ``jax.default_backend()``.

    Examples:
      >>> from kldiv.discrete import choose_logits_impl
      >>> choose_logits_impl((1024, 32768), backend="cpu")
      'chunked'
      >>> choose_logits_impl((8, 100), backend="cpu")
      'xla'
      >>> choose_logits_impl((8192, 131072), backend="gpu")
      'xla'
    """
    del dtype
    backend = jax.default_backend() if backend is None else backend
    backend = "gpu" if backend in ("cuda", "rocm") else backend
    size = 1
    for d in shape:
        size *= int(d)
    verified = AUTO_VERIFIED.get(backend, ())
    if size == 0:
        return "xla"
    if "pallas" in verified:
        return "pallas"
    if "chunked" in verified and size >= AUTO_CHUNKED_MIN_ELEMENTS:
        return "chunked"
    return "xla"


def _kl_from_aligned_logits(
    a,
    b,
    impl: str,
    *,
    where=None,
    temperature: float | ArrayLike = 1.0,
    transforms: Transforms = NO_TRANSFORMS,
) -> jax.Array:
    """KL(softmax(a/T)‖softmax(b/T)) along the last axis of aligned logits (``align_pair``),
    computed by ``impl``, as one compiled program (``jax.jit``; inside a caller's ``jit`` it is
    inlined): an eager call compiles once per shape and dtype instead of once per operation.
    A Python-number temperature and the logit transforms are compile-time constants."""
    t = static_temperature(temperature)
    if t is not None:
        return _aligned_static(a, b, where, impl=impl, temperature=t, transforms=transforms)
    return _aligned_traced(a, b, where, temperature, impl=impl, transforms=transforms)


def _aligned_logits_kl(a, b, where, temperature, impl: str, transforms: Transforms) -> jax.Array:
    """The body of :func:`_kl_from_aligned_logits`. A Python-number temperature and the logit
    ``transforms`` are applied per chunk or block by the fused paths; an array (traced)
    temperature is applied, with the transforms, to the whole inputs here (a full copy in the
    compute dtype), so that its gradient flows through ordinary autodiff. The Pallas kernel does
    not take transforms yet: ``"auto"`` then picks among the others."""
    if impl == "auto":
        impl = choose_logits_impl(a.shape, a.dtype)
    if impl == "xla":
        return kl_logits_aligned(a, b, where, temperature, transforms)
    t = static_temperature(temperature)
    if t is None:  # an array temperature: applied here, so that its gradient flows (full copy);
        # masked first, so that whatever a masked entry holds never meets the T derivative
        a, b = temper_and_mask_pair(a, b, temperature, where, None, transforms)
        t, transforms = 1.0, NO_TRANSFORMS
    if impl == "chunked":
        return kl_logits_chunked(a, b, where=where, temperature=t, transforms=transforms)
    from kldiv.fused.pallas import kl_logits_pallas  # optional: Pallas imports only when used

    return kl_logits_pallas(a, b, where=where, temperature=t, transforms=transforms)


_aligned_static = jax.jit(_aligned_logits_kl, static_argnames=("temperature", "impl", "transforms"))
_aligned_traced = jax.jit(_aligned_logits_kl, static_argnames=("impl", "transforms"))
