"""Discrete divergences around KL: reverse KL, Jeffreys, Jensen–Shannon, Rényi, α, f-divergences.

Every divergence comes in three input spaces, named like :func:`kldiv.kl`:

==========================================  ======================  ========================
function                                    inputs                  masked entries become
==========================================  ======================  ========================
``name(p, q)``                              probabilities           0
``name_from_log_probs(log_p, log_q)``       log-probabilities       −inf
``name_from_logits(logits_p, logits_q)``    softmax(logits / T)     −inf (in both softmaxes)
==========================================  ======================  ========================

Conventions shared by every function here (and by :mod:`kldiv.discrete`):

* Argument order is mathematical: ``D(p, q)`` is D(p‖q), p the reference/target (teacher), q
  the model (student). The event axis ``axis`` is summed over and removed; nothing reduces over
  examples (aggregate with :func:`kldiv.reduce`).
* ``where`` (boolean, broadcastable to the inputs) leaves entries out exactly as if the
  vocabulary excluded them: p = q = 0 (probabilities) or −inf (log-probabilities, logits, where
  they are also left out of both softmax normalisers). Whatever a masked entry holds (NaN, ±inf)
  touches neither the value nor the gradient. A row with no entries left gives 0.
* ``temperature`` (logits only) divides both logit arrays before the softmax, as in
  :func:`kldiv.kl_from_logits`; no T² factor is applied.
* ``logit_scale=s`` and ``softcap=c`` (logits only, default None: off) transform the logits of
  scaled and soft-capped (Gemma-style) heads before the temperature, in this order: logits ←
  c·tanh(s·x/c), then ÷T, exactly as in :func:`kldiv.kl_from_logits` (−inf stays −inf). Each is
  a Python number for both arrays or a ``(p, q)`` = (teacher, student) pair of numbers or None
  (``entropy_from_logits`` takes one number).
* Edges: an entry with p = q = 0 contributes 0; valid input never gives NaN; +inf comes out
  exactly where the divergence is infinite (e.g. KL-type terms with p > 0 = q).
* Gradients come from closed forms (``jax.custom_jvp``) and are finite wherever the value is
  (where the value is +inf they are 0, so masking such an example out later gives no NaN).
  With respect to log-probabilities and logits they are exact (the chain-rule factor p or q
  vanishes at the boundary). With respect to probabilities, a partial derivative that is
  infinite at a boundary entry (p = 0 or q = 0) while the value is finite is taken as 0, as in
  :func:`kldiv.kl`. The Rényi divergences use the centred gradient (components summing to zero
  along the simplex), which differs from the textbook partials by multiples of p or q, or by a
  constant: directions that any normalisation, e.g. a softmax, projects out.
* The formulas assume normalised inputs. Sums of non-negative terms (``kl_terms`` for KL-type
  terms) and log-ratios formed from error-free differences keep float32 accurate when p ≈ q,
  where textbook compositions cancel catastrophically.
* dtypes: bfloat16/float16 inputs are computed and returned in float32; float32 stays float32;
  float64 stays float64.

Parameters that select a formula (``beta``, ``alpha``, the f-generator) are static Python
numbers or callables, resolved at trace time.

Layout: one private module per divergence, each holding its rule (value and partial derivatives),
its cores (one closed-form ``custom_jvp`` per input space) and its three public functions;
``_core`` holds the shared pair/rule machinery and argument handling. Everything public is
re-exported here (and flat from :mod:`kldiv`).
"""

from __future__ import annotations

from kldiv.family._alpha import (
    alpha_divergence,
    alpha_divergence_from_log_probs,
    alpha_divergence_from_logits,
    alpha_generator,
)
from kldiv.family._chi2 import (
    pearson_chi2,
    pearson_chi2_from_log_probs,
    pearson_chi2_from_logits,
)
from kldiv.family._core import (
    FGenerator,
)
from kldiv.family._cross_entropy import (
    cross_entropy,
    cross_entropy_from_log_probs,
    cross_entropy_from_logits,
    entropy,
    entropy_from_log_probs,
    entropy_from_logits,
)
from kldiv.family._f_divergence import (
    F_GENERATORS,
    f_divergence,
    f_divergence_from_log_probs,
    f_divergence_from_logits,
)
from kldiv.family._hellinger import (
    squared_hellinger,
    squared_hellinger_from_log_probs,
    squared_hellinger_from_logits,
)
from kldiv.family._js import (
    js,
    js_from_log_probs,
    js_from_logits,
    js_generator,
)
from kldiv.family._kl import (
    jeffreys,
    jeffreys_from_log_probs,
    jeffreys_from_logits,
    reverse_kl,
    reverse_kl_from_log_probs,
    reverse_kl_from_logits,
)
from kldiv.family._renyi import (
    renyi,
    renyi_from_log_probs,
    renyi_from_logits,
)
from kldiv.family._total_variation import (
    total_variation,
    total_variation_from_log_probs,
    total_variation_from_logits,
)

__all__ = [
    "F_GENERATORS",
    "FGenerator",
    "alpha_divergence",
    "alpha_divergence_from_log_probs",
    "alpha_divergence_from_logits",
    "alpha_generator",
    "cross_entropy",
    "cross_entropy_from_log_probs",
    "cross_entropy_from_logits",
    "entropy",
    "entropy_from_log_probs",
    "entropy_from_logits",
    "f_divergence",
    "f_divergence_from_log_probs",
    "f_divergence_from_logits",
    "jeffreys",
    "jeffreys_from_log_probs",
    "jeffreys_from_logits",
    "js",
    "js_from_log_probs",
    "js_from_logits",
    "js_generator",
    "pearson_chi2",
    "pearson_chi2_from_log_probs",
    "pearson_chi2_from_logits",
    "renyi",
    "renyi_from_log_probs",
    "renyi_from_logits",
    "reverse_kl",
    "reverse_kl_from_log_probs",
    "reverse_kl_from_logits",
    "squared_hellinger",
    "squared_hellinger_from_log_probs",
    "squared_hellinger_from_logits",
    "total_variation",
    "total_variation_from_log_probs",
    "total_variation_from_logits",
]
