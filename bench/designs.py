"""Command line: ``python -m bench.designs [--n N] [--v V] [--repeats R] [--out DIR]``.

What other designs of the chunked forward pass would cost and how accurate they would be, timed
in one interleaved run with the shipped path and the logits suite's floors (same inputs as
``bench/suites/logits.py``). Each variant is the chunked forward (``kldiv/fused/chunked.py``:
chunks of ``chunk_rows`` rows, in cache) without masks, temperature or logit transforms, built
from the shared numerics of ``kldiv/_numerics.py``:

* ``row maxima, two-pass`` — the design before the sampled centres: per chunk the row maxima
  (a pass of its own over the chunk), then e^{x − max} and Σexp of both rows, then the terms
  p·ω(x) with x = log(p/q) formed from the error-free centred logits and the normalisers
  (``logits_terms``, ``logit_kl_terms``).
* ``sampled centre, two-pass`` — the shipped design (``kldiv-chunked``,
  ``kl_from_logits(impl="chunked")``) without its overflow test and fallback: the same, centred
  on the maxima of the chunk's first V/16 columns (``chunked.centre_columns``), its exponentials
  compensated for the rounding of x − centre (``exp_and_sum(compensated=True)``). The gap to
  ``kldiv-chunked`` is what the test costs on inputs that never need the fallback (these
  inputs' logits span about ±10), plus the per-row move of the statistics onto the
  log-normaliser (``_numerics.recentre``).
* ``sampled centre, two-pass, rounded exponents`` — the same with e^{fl(x − centre)}: what the
  compensation costs (its error, up to eps·(max − centre)/2 in each p, does not show on these
  inputs, whose maxima lie near their samples').
* ``row maxima, one-pass shifted`` — the shifted form KL = Σ p·ω(d − c̃) − ω(c − c̃) (d the
  centred log-ratio of the entries, c = log(Σe^{a−ma}/Σe^{b−mb}), here c̃ = 0): after the
  maxima, one pass forms Σexp of both rows and Σ e^{a−ma}·ω(d) together, with no second pass
  over the row.
* ``sampled centre, one-pass shifted`` — both changes.

The gradients formed in the forward pass against recomputed in the backward pass, timed in
the same rounds, for the student gradient alone (a frozen teacher, ``jax.grad`` w.r.t. the
student logits, against ``floor-1out``) and for both gradients (against ``floor-2out``):

* ``… formed in the forward`` — the forward pass forms the gradients of the differentiated
  inputs per chunk, on the row maxima (``chunked._gradient_rows``), and the backward pass
  scales them: shipped for one gradient (``student: formed in the forward``); for two,
  :func:`formed_forward` builds it;
* ``… recomputed in the backward`` — the sampled-centre forward above, then a backward pass
  that reads both inputs again and forms the gradients from the saved statistics
  (``chunked._kl_rows_bwd``): shipped for two gradients (``both: recomputed in the
  backward``); for the student alone, :func:`recomputing` builds it (the design before).

Each is the gradient of the rows' sum (a cotangent of 1 per row: the formed design's backward
pass then does nothing); both gradients are also timed for the rows' mean (``…, mean of the
rows``: a cotangent of 1/N, which the formed design applies in an in-place pass).

Columns: the forward's median time and its ratio to ``floor-read``; the float32 error against a
float64 reference on nearly equal distributions (KL ≈ 1e-8 per row, the logits suite's
``_near_inputs``: median and largest relative error, negative values); and, derived from
figures of the same run, the forward+backward time that kldiv's backward of two gradients
(measured: ``kldiv-chunked`` forward+backward minus its forward) would give with this forward,
and its ratio to ``floor-2out``: that backward reads the same residuals whatever the forward's
design (the inputs; centres, normalisers, KL). Writes ``DIR/designs.json``.
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np

from bench import common

_DESIGNS = (
    "row maxima, two-pass",
    "sampled centre, two-pass",
    "sampled centre, two-pass, rounded exponents",
    "row maxima, one-pass shifted",
    "sampled centre, one-pass shifted",
)


def design_forward(design: str, n: int, v: int):
    """The per-row KL of the chunked forward in ``design`` (one of ``_DESIGNS``), jitted."""
    from kldiv._numerics import (
        exp_and_sum,
        kl_terms,
        logit_kl_terms,
        logits_terms,
        omega,
        safe_max_pair,
        two_diff,
    )
    from kldiv.fused._rows import for_each_chunk, put_rows, rows
    from kldiv.fused.chunked import centre_columns, chunk_rows, row_sum

    if design not in _DESIGNS:
        raise ValueError(f"design must be one of {_DESIGNS}, got {design!r}")
    c = chunk_rows(n, v, jnp.float32)
    sample = centre_columns(v)

    def centres(ac, bc):
        if design.startswith("sampled centre"):
            return safe_max_pair(ac[:, :sample], bc[:, :sample])
        return safe_max_pair(ac, bc)

    def chunk_kl(ac, bc):
        ma, mb = centres(ac, bc)
        if "two-pass" in design:
            exact = design == "sampled centre, two-pass"  # as shipped
            (ea, sa), (eb, sb) = (
                exp_and_sum(x, m, compensated=exact) for x, m in ((ac, ma), (bc, mb))
            )
            return row_sum(logit_kl_terms(*logits_terms(ac, bc, ma, mb, sa, sb, (ea, eb))))
        ah, al = two_diff(ac, ma)
        bh, bl = two_diff(bc, mb)
        d = (ah - bh) + (al - bl)  # centred log-ratio, error-free
        ea, eb = jnp.exp(ah), jnp.exp(bh)
        sa, sb = jnp.sum(ea, -1), jnp.sum(eb, -1)
        shifted = row_sum(kl_terms(ea, eb, d))  # Σ e^{a−ma}·ω(d), unnormalised
        log_ratio = jnp.log1p((sa - sb) / sb)  # c
        return shifted / sa - omega(log_ratio)

    def forward(a, b):
        def body(start, _, out):
            return put_rows(out, chunk_kl(rows(a, start, c), rows(b, start, c)), start)

        return for_each_chunk(n, c, body, jnp.zeros((n,), jnp.float32))

    return jax.jit(forward)


STUDENT_DESIGNS = ("student: formed in the forward", "student: recomputed in the backward")
BOTH_DESIGNS = ("both: formed in the forward", "both: recomputed in the backward")
MEAN = ", mean of the rows"


def _grad_with_residuals(n: int, v: int, argnums: tuple[int, ...], residuals, reduce=jnp.sum):
    """∂reduce(KL)/∂(logits)[argnums] of the chunked KL whose forward pass is
    ``residuals(a, b, c, tr) -> (kl, res)`` and whose backward pass is the shipped
    ``chunked._kl_rows_bwd`` on those residuals (``c`` rows per chunk, no logit transforms);
    ``reduce``: over the rows, ``jnp.sum`` (a cotangent of 1 per row) or ``jnp.mean`` (1/N);
    jitted, ``f(t, s)``."""
    from kldiv.fused import chunked

    c, tr = chunked.chunk_rows(n, v, jnp.float32), (None, None)

    @jax.custom_vjp
    def kl_rows(a, b):
        return chunked._forward(a, b, None, c, 1.0, tr)[0]

    def bwd(res, g):
        ga, gb, _ = chunked._kl_rows_bwd(c, 1.0, tr, res, g)
        return ga, gb

    kl_rows.defvjp(lambda a, b: residuals(a, b, c, tr), bwd)
    return jax.jit(jax.grad(lambda a, b: reduce(kl_rows(a, b)), argnums=argnums))


def recomputing(n: int, v: int, argnums: tuple[int, ...] = (1,)):
    """∂(Σ KL)/∂(logits)[argnums] with the recomputing backward: the shipped forward (sampled
    centres, O(N) residuals), then a backward pass that reads both inputs again
    (``chunked._kl_rows_bwd``, the shipped path of two gradients), asked for those gradients
    only; jitted, ``f(t, s)``."""
    from kldiv.fused import chunked

    wanted = tuple((None,) if i in argnums else () for i in (0, 1))

    def residuals(a, b, c, tr):
        kl, res = chunked._forward(a, b, None, c, 1.0, tr)
        return kl, (res, wanted)

    return _grad_with_residuals(n, v, argnums, residuals)


def formed_forward(n: int, v: int, argnums: tuple[int, ...] = (0, 1), reduce=jnp.sum):
    """∂reduce(KL)/∂(logits)[argnums] with the gradients formed in the forward pass
    (``chunked._gradient_rows``, the shipped path of one gradient) and scaled in the backward
    pass (``chunked._kl_rows_bwd``: no pass at all for ``jnp.sum``, whose cotangent is 1);
    jitted, ``f(t, s)``."""
    from kldiv.fused import chunked

    def residuals(a, b, c, tr):
        kl, grads = chunked._gradient_rows(a, b, None, c, 1.0, tr, argnums)
        return kl, {"grads": dict(zip(argnums, grads, strict=True)), "where": None}

    return _grad_with_residuals(n, v, argnums, residuals, reduce)


def _errors(fn, t_near, s_near, ref) -> tuple[float, float, int]:
    vals = np.asarray(fn(jnp.asarray(t_near), jnp.asarray(s_near)), np.float64)
    rel = np.abs(vals - ref) / ref
    return float(np.median(rel)), float(rel.max()), int((vals < 0).sum())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.designs", description=__doc__)
    parser.add_argument("--n", type=int, default=1024, help="rows (tokens)")
    parser.add_argument("--v", type=int, default=32768, help="vocabulary size")
    parser.add_argument("--repeats", type=int, default=9, help="interleaved timed rounds")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", default="bench/results", help="directory for designs.json")
    args = parser.parse_args(argv)

    import kldiv
    from bench.suites.logits import _floors, _inputs, _near_inputs, _reference_f64

    n, v = args.n, args.v
    t, s = _inputs(n, v, jnp.float32)

    def shipped(a, b):
        return kldiv.kl_from_logits(a, b, impl="chunked")

    def shipped_total(a, b):
        return jnp.sum(shipped(a, b))

    def shipped_mean(a, b):
        return jnp.mean(shipped(a, b))

    fwd = {"kldiv-chunked": jax.jit(shipped)}
    fwd.update({d: design_forward(d, n, v) for d in _DESIGNS})
    floors = _floors()
    student = {
        STUDENT_DESIGNS[0]: jax.jit(jax.grad(shipped_total, argnums=1)),
        STUDENT_DESIGNS[1]: recomputing(n, v, (1,)),
    }
    both = {
        BOTH_DESIGNS[0]: formed_forward(n, v, (0, 1)),
        BOTH_DESIGNS[1]: jax.jit(jax.grad(shipped_total, argnums=(0, 1))),
        # the mean of the rows: a cotangent of 1/N, which the formed design scales in place
        BOTH_DESIGNS[0] + MEAN: formed_forward(n, v, (0, 1), jnp.mean),
        BOTH_DESIGNS[1] + MEAN: jax.jit(jax.grad(shipped_mean, argnums=(0, 1))),
    }
    fns = {
        **fwd,
        **student,
        **both,
        "kldiv-chunked fwd+bwd": jax.jit(jax.value_and_grad(shipped_total, argnums=(0, 1))),
        "floor-read": floors["floor-read"],
        "floor-1out": floors["floor-1out"],
        "floor-2out": floors["floor-2out"],
    }
    print(f"timing {len(fns)} functions, {args.repeats} rounds ...", file=sys.stderr, flush=True)
    times = common.timeit_interleaved(fns, t, s, repeats=args.repeats, warmup=args.warmup)
    ms = {k: 1e3 * x for k, x in times.items()}
    # the backward that reads the residuals of these forward designs (the inputs and O(N) row
    # statistics): the shipped one of two gradients, measured as its time minus the forward's
    backward = ms["kldiv-chunked fwd+bwd"] - ms["kldiv-chunked"]

    tn, sn = _near_inputs(n, v)
    ref = _reference_f64(tn, sn)
    shipped_value = np.asarray(fwd["kldiv-chunked"](t, s), np.float64)
    rows = []
    for name, fn in fwd.items():
        med, worst, neg = _errors(fn, tn, sn, ref)
        value = np.asarray(fn(t, s), np.float64)
        rows.append(
            {
                "design": name,
                "fwd_ms": ms[name],
                "fwd_vs_floor_read": ms[name] / ms["floor-read"],
                "rel_err_median": med,
                "rel_err_max": worst,
                "negative": neg,
                "vs_shipped": float(np.max(np.abs(value - shipped_value) / shipped_value)),
                "fwdbwd_ms_derived": ms[name] + backward,
                "fwdbwd_vs_floor_2out_derived": (ms[name] + backward) / ms["floor-2out"],
            }
        )
    grads = {name: np.asarray(fn(t, s), np.float64) for name, fn in student.items()}
    scale = np.max(np.abs(grads[STUDENT_DESIGNS[1]]))
    for name in STUDENT_DESIGNS:
        rows.append(
            {
                "design": name,
                "student_ms": ms[name],
                "student_vs_floor_1out": ms[name] / ms["floor-1out"],
                "vs_recomputed": float(np.max(np.abs(grads[name] - grads[STUDENT_DESIGNS[1]])))
                / scale,
            }
        )
    grads2 = {name: [np.asarray(x, np.float64) for x in fn(t, s)] for name, fn in both.items()}
    for name in both:
        recomputed = BOTH_DESIGNS[1] + (MEAN if name.endswith(MEAN) else "")
        rows.append(
            {
                "design": name,
                "both_ms": ms[name],
                "both_vs_floor_2out": ms[name] / ms["floor-2out"],
                "vs_recomputed": max(
                    float(np.max(np.abs(x - y)) / np.max(np.abs(y)))
                    for x, y in zip(grads2[name], grads2[recomputed], strict=True)
                ),
            }
        )
    for name in ("kldiv-chunked fwd+bwd", "floor-read", "floor-1out", "floor-2out"):
        rows.append({"design": name, "fwd_ms": ms[name]})
    print(f"\n### chunked forward designs, [{n}, {v}] float32 (KL ≈ 1e-8 for the errors)\n")
    print(common.format_table(rows))
    common.write_json(f"{args.out}/designs.json", "designs", rows, vars(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
