"""kldiv: divergence kernels for JAX.

Every divergence returns one value per example (the event axis summed away); aggregation over
examples is always explicit, through :func:`kldiv.reduce`. Argument order is mathematical:
``kl(p, q)`` is KL(p‖q) with p the reference/target and q the model.
"""

from kldiv._checks import validate_log_probs, validate_probs
from kldiv.discrete import kl, kl_from_log_probs, kl_from_logits
from kldiv.estimators import (
    ESTIMATORS,
    kl_k1,
    kl_k2,
    kl_k3,
    kl_k3_importance_weighted,
    kl_penalty,
    kl_penalty_exact,
    kl_straight_through,
)
from kldiv.montecarlo import MCKLEstimate, mc_kl
from kldiv.reductions import REDUCTIONS, count_kept, reduce
from kldiv.topk import kl_topk_teacher, validate_topk_ids

__version__ = "0.1.0"

__all__ = [
    "ESTIMATORS",
    "MCKLEstimate",
    "REDUCTIONS",
    "count_kept",
    "kl",
    "kl_from_log_probs",
    "kl_from_logits",
    "kl_k1",
    "kl_k2",
    "kl_k3",
    "kl_k3_importance_weighted",
    "kl_penalty",
    "kl_penalty_exact",
    "kl_straight_through",
    "kl_topk_teacher",
    "mc_kl",
    "reduce",
    "validate_log_probs",
    "validate_probs",
    "validate_topk_ids",
]
