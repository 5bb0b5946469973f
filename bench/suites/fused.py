"""Fused large-vocabulary KL: ``kl_from_logits`` (chunked/Pallas) and ``fused_linear_kl``.

Cases (``--fused-cases``, comma-separated; default: all):

``target_logits``
    [1024, 32768] float32, KL(softmax(teacher) ‖ softmax(student)) forward and forward+backward
    (gradients w.r.t. both logits), summed. Peer: the optax composition (``jax.nn.log_softmax``
    of both + ``optax.losses.kl_divergence_with_log_targets``, summed, autodiff); also torch's
    ``F.kl_div(log_target=True)`` and ejkernel's ``fused_kl_divergence`` where installed. Target:
    fwd+bwd time ≤ 0.6× optax, compiled temporary memory ≤ 0.05× optax.
``target_linear``
    ``fused_linear_kl`` with [2048 × 512] @ [512 × 32768] float32 for both heads, reduction
    ``"mean"``, forward+backward w.r.t. the student's hidden states and weight. Peer
    ("materialised"): both logit tensors computed first, then ``kl_from_logits`` (default impl)
    and ``kldiv.reduce``; also the same with the optax composition. Target: time ≤ 1.0× and
    temporary memory ≤ 0.15× of the materialised version.
``grad_filter``
    ``fused_linear_kl`` forward+backward (w.r.t. the student's hidden states and weight) exact
    (``grad_filter=None``) and with gradient filtering at τ = eps(float32) = 1.19e-7, against the
    materialised path (both logits, ``kl_from_logits``, ``kldiv.reduce``, autodiff), at [2048 ×
    512] @ [512 × 32768] float32, reduction ``"mean"``, on peaked logits from a documented
    synthetic generator (``_peaked_linear_inputs``: a Zipf-like bias −κ·ln(1 + v) over a vocabulary
    sorted by frequency and a context-dependent part whose scale shrinks for rare columns); the
    rows report its teacher entropy, the fraction of [chunk × tile] gradient blocks below τ and
    the filtered gradient's largest error as a fraction of the documented bound. Target: fwd+bwd
    time ≤ 0.7× and temporary memory ≤ 0.15× of the materialised path, the error within bound.
``topk_linear``
    ``fused_linear_topk_kl`` (a stored top-k teacher, k = 64, against the student's linear head
    [2048 × 512] @ [512 × 32768] float32; quick: [256 × 64] @ [64 × 4096]), reduction ``"mean"``,
    forward+backward w.r.t. the student's hidden states and weight, once per tail. Peer
    ("materialised"): the student logits computed first, then ``kl_topk_teacher`` and autodiff.
``scaling``
    Time and temporary memory against N and V for the logits paths (optax, xla, chunked) and
    the linear paths (materialised, fused): memory is flat in N for the fused paths.
``crossover``
    xla vs chunked forward+backward on small shapes: where ``impl="auto"`` switches.
``penalty``
    An exact per-token KL penalty over the full vocabulary (``kl_from_logits``, policy vs
    reference logits, gradient w.r.t. the policy logits) against the sampled k3 estimator
    (``kldiv.estimators.kl_k3`` on log-probabilities gathered from ``jax.nn.log_softmax`` of
    both logits at the sampled tokens), [8192 tokens, 32768 vocabulary]. From hidden states:
    the exact per-token KL of the fused head (``fused_linear_kl_penalty``, reduction
    ``"none"``, then the mean; gradients w.r.t. the policy's hidden states and weight) against
    k3 from the materialised logits of both heads, [2048 × 512] @ [512 × 32768].
``softcap``
    The cost of a logit soft-cap (``softcap=30``, Gemma-style c·tanh(x/c)) on the chunked path,
    [1024, 32768] float32 (``--quick``: [512, 8192]) forward+backward:
    ``kl_from_logits(impl="chunked", softcap=30)``
    (applied per chunk, chain-rule factor in the backward pass) against the same call without
    a cap (the peer) and against materialising the capped logits first (30·tanh(x/30) of both,
    then the chunked call without a cap; autodiff through the tanh), in the same run.
``gpu``
    Pallas kernel vs optax/xla on GPU, bfloat16 [8192, 131072]. Without a GPU backend these rows
    say "not measured (no GPU)" instead of numbers.

Method: every function is jitted and timed with ``bench.common.timeit`` (warm-up, then the
median of ``--repeats`` runs, blocking on the results). Machines are shared, so each case is
measured in ``--fused-rounds`` interleaved rounds, every candidate once per round next to its
peer; the reported time is the median over rounds and the ratio the median of the per-round
ratios. Temporary memory: ``bench.common.temp_bytes`` of the jitted forward+backward.
"""

from __future__ import annotations

import statistics

import matplotlib

matplotlib.use("Agg")

import jax
import jax.numpy as jnp
import numpy as np

import kldiv
from bench import common
from kldiv import discrete, fused_linear

NAME = "fused"
CASES = (
    "target_logits",
    "target_linear",
    "grad_filter",
    "topk_linear",
    "scaling",
    "crossover",
    "penalty",
    "softcap",
    "gpu",
)
NOT_MEASURED = "not measured (no GPU)"


def add_arguments(parser) -> None:
    parser.add_argument("--fused-cases", default=",".join(CASES), help="comma-separated cases")
    parser.add_argument("--fused-rounds", type=int, default=3, help="interleaved rounds per case")
    parser.add_argument(
        "--fused-scaling-n", default="256,1024,4096", help="N values of the scaling table"
    )
    parser.add_argument(
        "--fused-scaling-v", default="8192,32768,131072", help="V values of the scaling table"
    )


# ---------------------------------------------------------------------------------------------
# Candidates. Logits: (teacher, student) -> scalar loss; gradients w.r.t. both.


def _optax_loss(t, s):
    import optax

    lp = jax.nn.log_softmax(t.astype(jnp.float32))
    lq = jax.nn.log_softmax(s.astype(jnp.float32))
    return jnp.sum(optax.losses.kl_divergence_with_log_targets(lq, lp))


def _kldiv_loss(impl):
    def loss(t, s):
        return jnp.sum(kldiv.kl_from_logits(t, s, impl=impl))

    return loss


def _ejkernel_loss():
    from ejkernel.modules.operations.fused_kl_divergence import fused_kl_divergence

    def loss(t, s):
        return jnp.sum(fused_kl_divergence(s, t, reduction="none", platform="xla").loss)

    return loss


def _logits_candidates(with_peers: bool) -> dict:
    cands = {"optax": _optax_loss, "kldiv-xla": _kldiv_loss("xla")}
    cands["kldiv-chunked"] = _kldiv_loss("chunked")
    cands["kldiv-auto"] = _kldiv_loss("auto")
    if with_peers:
        try:
            cands["ejkernel-xla"] = _ejkernel_loss()
        except ImportError:
            pass
    return cands


def _fwd_and_grad(loss, argnums=(0, 1)):
    return jax.jit(loss), jax.jit(jax.value_and_grad(loss, argnums))


def _logits_inputs(n, v, dtype=jnp.float32, seed=0):
    rng = np.random.default_rng(seed)
    t = jnp.asarray(rng.normal(size=(n, v)).astype(np.float32) * 2, dtype)
    s = jnp.asarray(rng.normal(size=(n, v)).astype(np.float32) * 2, dtype)
    return t, s


def _measure(cands: dict, args, inputs, rounds: int, peer: str, progress, label: str):
    """Interleaved rounds; per candidate the median time and the median ratio to ``peer``."""
    fns = {
        k: _fwd_and_grad(*f) if isinstance(f, tuple) else _fwd_and_grad(f) for k, f in cands.items()
    }
    temps = {}
    for k, (_, fb) in fns.items():
        try:
            temps[k] = common.temp_bytes(fb, *inputs)
        except Exception:  # noqa: BLE001 - memory analysis is best effort
            temps[k] = None
    times = {k: {"fwd": [], "fwdbwd": []} for k in fns}
    for r in range(rounds):
        for k, (fwd, fb) in fns.items():
            progress(f"{label}: round {r + 1}/{rounds} {k}")
            times[k]["fwd"].append(
                common.timeit(fwd, *inputs, repeats=args.repeats, warmup=args.warmup)
            )
            times[k]["fwdbwd"].append(
                common.timeit(fb, *inputs, repeats=args.repeats, warmup=args.warmup)
            )
    out = {}
    for k in fns:
        ratios = [a / b for a, b in zip(times[k]["fwdbwd"], times[peer]["fwdbwd"], strict=True)]
        fwd_ratios = [a / b for a, b in zip(times[k]["fwd"], times[peer]["fwd"], strict=True)]
        out[k] = {
            "fwd_ms": 1e3 * statistics.median(times[k]["fwd"]),
            "fwdbwd_ms": 1e3 * statistics.median(times[k]["fwdbwd"]),
            "fwd_ratio": statistics.median(fwd_ratios),
            "ratio": statistics.median(ratios),
            "ratios": [round(x, 3) for x in ratios],
            "temp_bytes": temps[k],
            "temp_ratio": (
                temps[k] / temps[peer] if temps[k] is not None and temps[peer] else None
            ),
        }
    return out


def _torch_logits(t, s, args, progress) -> dict | None:
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        return None
    tt = torch.from_numpy(np.array(t, np.float32))
    ts = torch.from_numpy(np.array(s, np.float32))

    def fwd(a, b):
        with torch.no_grad():
            return F.kl_div(
                F.log_softmax(b, -1), F.log_softmax(a, -1), log_target=True, reduction="sum"
            )

    def fwdbwd(a, b):
        a = a.detach().requires_grad_(True)
        b = b.detach().requires_grad_(True)
        loss = F.kl_div(
            F.log_softmax(b, -1), F.log_softmax(a, -1), log_target=True, reduction="sum"
        )
        loss.backward()
        return loss

    progress("target_logits: torch")
    return {
        "fwd_ms": 1e3 * common.timeit_torch(fwd, tt, ts, repeats=args.repeats, warmup=args.warmup),
        "fwdbwd_ms": 1e3
        * common.timeit_torch(fwdbwd, tt, ts, repeats=args.repeats, warmup=args.warmup),
    }


def _row(case, impl, n, v, dtype, m, ratio_key, **extra) -> dict:
    row = {
        "case": case,
        "impl": impl,
        "N": n,
        "V": v,
        "dtype": dtype,
        "fwd_ms": m.get("fwd_ms"),
        "fwdbwd_ms": m.get("fwdbwd_ms"),
        ratio_key: m.get("ratio"),
        "temp_bytes": m.get("temp_bytes"),
        "temp_ratio": m.get("temp_ratio"),
    }
    if "ratios" in m:
        row["round_ratios"] = m["ratios"]
    row.update(extra)
    return row


# ---------------------------------------------------------------------------------------------
# Cases.


def _target_logits(args, progress, quick):
    n, v = (128, 4096) if quick else (1024, 32768)
    t, s = _logits_inputs(n, v)
    res = _measure(
        _logits_candidates(True),
        args,
        (t, s),
        args.fused_rounds,
        "optax",
        progress,
        "target_logits",
    )
    rows = []
    for k, m in res.items():
        extra = {}
        if k in ("kldiv-chunked", "kldiv-auto"):
            extra["target"] = "fwdbwd ≤ 0.6× optax, temp ≤ 0.05× optax"
            extra["meets_target"] = bool(m["ratio"] <= 0.6 and (m["temp_ratio"] or 1) <= 0.05)
        rows.append(_row("target_logits", k, n, v, "float32", m, "ratio_vs_optax", **extra))
    torch_m = _torch_logits(t, s, args, progress)
    if torch_m is not None:
        opt = res["optax"]
        torch_m["ratio"] = torch_m["fwdbwd_ms"] / opt["fwdbwd_ms"]
        rows.append(
            _row(
                "target_logits",
                "torch",
                n,
                v,
                "float32",
                torch_m,
                "ratio_vs_optax",
                note="ratio against the median optax time (not interleaved)",
            )
        )
    return rows


def _linear_inputs(n, h, v, seed=0):
    rng = np.random.default_rng(seed)
    f = lambda *shape, scale=1.0: jnp.asarray(  # noqa: E731
        (rng.normal(size=shape) * scale).astype(np.float32)
    )
    return f(n, h), f(h, v, scale=h**-0.5), f(n, h), f(h, v, scale=h**-0.5)


def _materialised(kl_impl):
    def loss(hs, ws, ht, wt):
        zs, zt = hs @ ws, jax.lax.stop_gradient(ht @ wt)
        if kl_impl == "optax":
            lp, lq = jax.nn.log_softmax(zt), jax.nn.log_softmax(zs)
            import optax

            values = optax.losses.kl_divergence_with_log_targets(lq, lp)
        else:
            values = kldiv.kl_from_logits(zt, zs, impl=kl_impl)
        return kldiv.reduce(values, "mean")

    return loss


def _fused_linear(hs, ws, ht, wt):
    return kldiv.fused_linear_kl(ht, wt, hs, ws, reduction="mean")


def _linear_candidates():
    return {
        "materialised": (_materialised("auto"), (0, 1)),
        "materialised-optax": (_materialised("optax"), (0, 1)),
        "fused_linear_kl": (_fused_linear, (0, 1)),
    }


def _target_linear(args, progress, quick):
    n, h, v = (256, 64, 4096) if quick else (2048, 512, 32768)
    inputs = _linear_inputs(n, h, v)
    res = _measure(
        _linear_candidates(),
        args,
        inputs,
        args.fused_rounds,
        "materialised",
        progress,
        "target_linear",
    )
    rows = []
    for k, m in res.items():
        extra = {"H": h}
        if k == "fused_linear_kl":
            extra["target"] = "fwdbwd ≤ 1.0× materialised, temp ≤ 0.15× materialised"
            extra["meets_target"] = bool(m["ratio"] <= 1.0 and (m["temp_ratio"] or 1) <= 0.15)
        rows.append(_row("target_linear", k, n, v, "float32", m, "ratio_vs_materialised", **extra))
    return rows


# Peaked logits for grad_filter: teacher column v (the vocabulary sorted by frequency, v = 0 the
# most frequent) has logit −KAPPA·ln(1 + v) + ξ_v·SIGMA/sqrt(1 + v/V0), ξ_v ~ N(0, 1) varying with
# the context: a Zipf-like prior over ranks and a context-dependent part that shrinks for rare
# columns (rarely trained tokens have small output embeddings). The student is the teacher with
# its hidden states and the context-dependent part of its weights perturbed by DELTA.
PEAKED = {"kappa": 2.0, "sigma": 3.0, "v0": 256.0, "delta": 0.3}


def _peaked_linear_inputs(n, h, v, *, kappa, sigma, v0, delta, seed=0):
    """(student_hidden, student_weight, teacher_hidden, teacher_weight), float32; the first hidden
    coordinate is 1 and its weight row the bias −kappa·ln(1 + v)."""
    rng = np.random.default_rng(seed)
    scale = sigma / np.sqrt(1 + np.arange(v) / v0) / np.sqrt(h - 1)
    wt = np.empty((h, v))
    wt[0] = -kappa * np.log1p(np.arange(v))
    wt[1:] = rng.normal(size=(h - 1, v)) * scale
    ws = wt.copy()
    ws[1:] += delta * rng.normal(size=(h - 1, v)) * scale
    ht = np.concatenate([np.ones((n, 1)), rng.normal(size=(n, h - 1))], axis=1)
    hs = ht + delta * rng.normal(size=ht.shape)
    hs[:, 0] = 1.0
    return tuple(jnp.asarray(x, jnp.float32) for x in (hs, ws, ht, wt))


def _peaked_profile(hs, ws, ht, wt, tau, chunk, tile) -> dict:
    """Teacher entropy (nats), mean KL, and the fraction of [chunk × tile] blocks of the
    per-token student-logit gradient q − p whose entries are all ≤ tau (the skippable ones)."""
    lp, lq = jax.nn.log_softmax(ht @ wt), jax.nn.log_softmax(hs @ ws)
    p, q = jnp.exp(lp), jnp.exp(lq)
    ent = np.asarray(-jnp.sum(p * lp, axis=-1))
    kl = float(jnp.mean(jnp.sum(p * (lp - lq), axis=-1)))
    n, v = p.shape
    big = np.asarray(jnp.abs(q - p) > tau)[: n - n % chunk, : v - v % tile]
    live = big.reshape(n // chunk, chunk, v // tile, tile).any(axis=(1, 3))
    return {
        "teacher_entropy_mean": round(float(ent.mean()), 3),
        "teacher_entropy_p10_p50_p90": [
            round(float(x), 3) for x in np.percentile(ent, [10, 50, 90])
        ],
        "kl_mean": round(kl, 4),
        "skippable_tiles": round(float(1 - live.mean()), 4),
    }


def _grad_filter(args, progress, quick):
    n, h, v = (256, 64, 4096) if quick else (2048, 512, 32768)
    inputs = _peaked_linear_inputs(n, h, v, **PEAKED)
    tau = float(jnp.finfo(jnp.float32).eps)

    def filtered(hs, ws, ht, wt):
        return kldiv.fused_linear_kl(ht, wt, hs, ws, reduction="mean", grad_filter=tau)

    cands = {
        "materialised": (_materialised("auto"), (0, 1)),
        "fused_linear_kl": (_fused_linear, (0, 1)),
        "fused_linear_kl grad_filter=eps": (filtered, (0, 1)),
    }
    res = _measure(cands, args, inputs, args.fused_rounds, "materialised", progress, "grad_filter")
    # The filtered gradient against the exact one and the documented bound (reduction "mean",
    # no mask: every token's cotangent is c = 1/n): |Δ grad_hidden[i, k]| ≤ τ·c·‖W[k, :]‖₁,
    # |Δ grad_weight[k, v]| ≤ τ·c·Σ_i |x[i, k]|.
    progress("grad_filter: gradient error")
    hs, ws, ht, wt = inputs
    exact = jax.jit(jax.grad(_fused_linear, (0, 1)))(*inputs)
    approx = jax.jit(jax.grad(filtered, (0, 1)))(*inputs)
    bounds = (
        tau / n * jnp.sum(jnp.abs(ws), axis=1)[None, :],
        tau / n * jnp.sum(jnp.abs(hs), axis=0)[:, None],
    )
    err = [jnp.abs(a - e) for a, e in zip(approx, exact, strict=True)]
    of_bound = max(float(jnp.max(d / b)) for d, b in zip(err, bounds, strict=True))
    rel = max(float(jnp.max(d) / jnp.max(jnp.abs(e))) for d, e in zip(err, exact, strict=True))
    chunk = min(n, max(fused_linear.MIN_CHUNK, fused_linear.CHUNK_BYTES // (v * 4)))
    tile = fused_linear.GRAD_FILTER_TILE
    profile = _peaked_profile(hs, ws, ht, wt, tau, chunk, tile)
    rows = []
    for k, m in res.items():
        extra = {"H": h, "inputs": f"peaked {PEAKED}", **profile}
        if k.startswith("fused"):
            extra["target"] = "fwdbwd ≤ 0.7× materialised, temp ≤ 0.15× materialised"
            extra["meets_target"] = bool(m["ratio"] <= 0.7 and (m["temp_ratio"] or 1) <= 0.15)
        if k.endswith("grad_filter=eps"):
            extra.update(
                grad_filter=tau,
                chunk=chunk,
                tile=tile,
                max_error_of_bound=round(of_bound, 6),
                max_rel_error=rel,
                within_bound=bool(of_bound <= 1.0),
            )
        rows.append(_row("grad_filter", k, n, v, "float32", m, "ratio_vs_materialised", **extra))


def _topk_inputs(n, h, v, k, seed=0):
    """Student hidden/weight and a stored top-k teacher (ids, log-probs) of its own logits."""
    rng = np.random.default_rng(seed)
    teacher = rng.normal(size=(n, v)).astype(np.float32) * 2
    ids = np.argsort(-teacher, -1)[:, :k]
    lse = np.log(np.sum(np.exp(teacher - teacher.max(-1, keepdims=True)), -1, keepdims=True))
    lp = np.take_along_axis(teacher, ids, -1) - teacher.max(-1, keepdims=True) - lse
    hs, ws, _, _ = _linear_inputs(n, h, v, seed + 1)
    return hs, ws, jnp.asarray(ids, jnp.int32), jnp.asarray(lp, jnp.float32)


def _topk_candidates(tail):
    def materialised(hs, ws, ids, lp):
        return kldiv.kl_topk_teacher(ids, lp, hs @ ws, tail=tail, reduction="mean")

    def fused(hs, ws, ids, lp):
        return kldiv.fused_linear_topk_kl(ids, lp, hs, ws, tail=tail, reduction="mean")

    return {"materialised": (materialised, (0, 1)), "fused_linear_topk_kl": (fused, (0, 1))}


def _topk_linear(args, progress, quick):
    n, h, v, k = (256, 64, 4096, 64) if quick else (2048, 512, 32768, 64)
    inputs = _topk_inputs(n, h, v, k)
    rows = []
    for tail in ("renormalize", "bucket"):
        res = _measure(
            _topk_candidates(tail),
            args,
            inputs,
            args.fused_rounds,
            "materialised",
            progress,
            f"topk_linear {tail}",
        )
        for key, m in res.items():
            extra = {"H": h, "k": k, "tail": tail}
            rows.append(
                _row("topk_linear", key, n, v, "float32", m, "ratio_vs_materialised", **extra)
            )
    return rows


def _ints(text):
    return [int(x) for x in text.split(",") if x]


def _scaling(args, progress, quick):
    ns = [64, 256] if quick else _ints(args.fused_scaling_n)
    vs = [2048, 8192] if quick else _ints(args.fused_scaling_v)
    n_fixed, v_fixed = ns[len(ns) // 2], vs[len(vs) // 2]
    rounds = 1
    rows = []
    cands = {
        "optax": _optax_loss,
        "kldiv-xla": _kldiv_loss("xla"),
        "kldiv-chunked": _kldiv_loss("chunked"),
    }
    shapes = [(n, v_fixed) for n in ns] + [(n_fixed, v) for v in vs if v != v_fixed]
    for n, v in shapes:
        res = _measure(
            cands,
            args,
            _logits_inputs(n, v),
            rounds,
            "optax",
            progress,
            f"scaling logits N={n} V={v}",
        )
        rows += [
            _row("scaling_logits", k, n, v, "float32", m, "ratio_vs_optax") for k, m in res.items()
        ]
    h = 64 if quick else 512
    for n, v in [(n, v_fixed) for n in ns] + [(n_fixed, v) for v in vs if v != v_fixed]:
        lin = _linear_candidates()
        del lin["materialised-optax"]
        res = _measure(
            lin,
            args,
            _linear_inputs(n, h, v),
            rounds,
            "materialised",
            progress,
            f"scaling linear N={n} V={v}",
        )
        rows += [
            _row("scaling_linear", k, n, v, "float32", m, "ratio_vs_materialised", H=h)
            for k, m in res.items()
        ]
    return rows


def _crossover(args, progress, quick):
    shapes = (
        [(4, 2048), (16, 8192)]
        if quick
        else [
            (8, 8192),
            (32, 8192),
            (128, 8192),
            (512, 8192),
            (8, 32768),
            (32, 32768),
            (128, 32768),
        ]
    )
    cands = {"kldiv-xla": _kldiv_loss("xla"), "kldiv-chunked": _kldiv_loss("chunked")}
    rows = []
    for n, v in shapes:
        res = _measure(
            cands,
            args,
            _logits_inputs(n, v),
            args.fused_rounds,
            "kldiv-xla",
            progress,
            f"crossover N={n} V={v}",
        )
        for k, m in res.items():
            rows.append(
                _row(
                    "crossover",
                    k,
                    n,
                    v,
                    "float32",
                    m,
                    "ratio_vs_xla",
                    auto=discrete.choose_logits_impl((n, v)),
                )
            )
    return rows


def _penalty(args, progress, quick):
    n, v = (512, 4096) if quick else (8192, 32768)
    rng = np.random.default_rng(3)
    policy, ref = _logits_inputs(n, v, seed=4)
    tokens = jnp.asarray(rng.integers(0, v, n))

    def exact(pl, rl):
        return jnp.mean(kldiv.kl_from_logits(pl, jax.lax.stop_gradient(rl)))

    try:
        from kldiv.estimators import kl_k3

        k3_label = "k3 (kldiv.estimators.kl_k3, log_softmax gather)"
    except ImportError:  # pragma: no cover - estimators module absent

        def kl_k3(lp, lr):
            d = lr - lp
            return jnp.expm1(d) - d

        k3_label = "k3 (inline (r − 1) − log r, log_softmax gather; peer baseline)"

    def k3(pl, rl):
        def gather(z):
            return jnp.take_along_axis(jax.nn.log_softmax(z), tokens[:, None], -1)[:, 0]

        return jnp.mean(kl_k3(gather(pl), jax.lax.stop_gradient(gather(rl))))

    cands = {"exact-kl (kl_from_logits, auto)": (exact, (0,)), k3_label: (k3, (0,))}
    res = _measure(cands, args, (policy, ref), args.fused_rounds, k3_label, progress, "penalty")
    rows = [_row("penalty", k, n, v, "float32", m, "ratio_vs_k3") for k, m in res.items()]
    return rows + _penalty_hidden(args, progress, quick, kl_k3)


def _penalty_hidden(args, progress, quick, kl_k3):
    """The penalty from hidden states: the exact per-token KL of the fused head
    (``fused_linear_kl_penalty``, reduction "none", then the mean) against k3 from the
    materialised policy and reference logits (log_softmax, gathered at sampled tokens); gradients
    w.r.t. the policy's hidden states and weight."""
    n, h, v = (256, 64, 4096) if quick else (2048, 512, 32768)
    policy_hidden, policy_weight, ref_hidden, ref_weight = _linear_inputs(n, h, v, seed=5)
    tokens = jnp.asarray(np.random.default_rng(6).integers(0, v, n))

    def exact(ph, pw, rh, rw):
        return jnp.mean(kldiv.fused_linear_kl_penalty(rh, rw, ph, pw, reduction="none"))

    def k3(ph, pw, rh, rw):
        def gather(z):
            return jnp.take_along_axis(jax.nn.log_softmax(z), tokens[:, None], -1)[:, 0]

        ref_logp = jax.lax.stop_gradient(gather(rh @ rw))
        return jnp.mean(kl_k3(gather(ph @ pw), ref_logp))

    peer = "k3 from hidden states (materialised logits, log_softmax gather)"
    cands = {
        "exact-kl from hidden states (fused_linear_kl_penalty, none)": (exact, (0, 1)),
        peer: (k3, (0, 1)),
    }
    inputs = (policy_hidden, policy_weight, ref_hidden, ref_weight)
    res = _measure(cands, args, inputs, args.fused_rounds, peer, progress, "penalty (hidden)")
    return [
        _row("penalty", k, n, v, "float32", m, "ratio_vs_k3_hidden", H=h) for k, m in res.items()
    ]


def _softcap(args, progress, quick):
    # Quick: still several row chunks (chunked.CHUNK_BYTES), so that the per-chunk transform is
    # what is measured.
    n, v = (512, 8192) if quick else (1024, 32768)
    t, s = _logits_inputs(n, v, seed=5)
    cap = 30.0

    def capped(x):
        return cap * jnp.tanh(x / cap)

    def per_chunk(a, b):
        return jnp.sum(kldiv.kl_from_logits(a, b, impl="chunked", softcap=cap))

    def materialised(a, b):
        return jnp.sum(kldiv.kl_from_logits(capped(a), capped(b), impl="chunked"))

    peer = "chunked, no softcap"
    cands = {
        peer: _kldiv_loss("chunked"),
        "chunked, softcap=30 (per chunk)": per_chunk,
        "chunked on materialised 30·tanh(x/30)": materialised,
    }
    res = _measure(cands, args, (t, s), args.fused_rounds, peer, progress, "softcap")
    return [_row("softcap", k, n, v, "float32", m, "ratio_vs_no_softcap") for k, m in res.items()]


def _gpu(args, progress, quick):
    n, v = (512, 8192) if quick else (8192, 131072)
    impls = ("optax", "kldiv-xla", "kldiv-pallas")
    if jax.default_backend() != "gpu":
        return [
            {
                "case": "gpu",
                "impl": k,
                "N": n,
                "V": v,
                "dtype": "bfloat16",
                "fwd_ms": NOT_MEASURED,
                "fwdbwd_ms": NOT_MEASURED,
                "ratio_vs_optax": NOT_MEASURED,
                "temp_bytes": NOT_MEASURED,
                "temp_ratio": NOT_MEASURED,
            }
            for k in impls
        ]
    t, s = _logits_inputs(n, v, jnp.bfloat16)
    cands = {
        "optax": _optax_loss,
        "kldiv-xla": _kldiv_loss("xla"),
        "kldiv-pallas": _kldiv_loss("pallas"),
    }
    res = _measure(cands, args, (t, s), args.fused_rounds, "optax", progress, "gpu")
    return [_row("gpu", k, n, v, "bfloat16", m, "ratio_vs_optax") for k, m in res.items()]


_RUNNERS = {
    "target_logits": _target_logits,
    "target_linear": _target_linear,
    "grad_filter": _grad_filter,
    "topk_linear": _topk_linear,
    "scaling": _scaling,
    "crossover": _crossover,
    "penalty": _penalty,
    "softcap": _softcap,
    "gpu": _gpu,
}


def run(args, progress) -> list[dict]:
    wanted = [c for c in args.fused_cases.split(",") if c]
    unknown = [c for c in wanted if c not in _RUNNERS]
    if unknown:
        raise ValueError(f"unknown fused cases {unknown}; available: {list(_RUNNERS)}")
    rows = []
    for case in wanted:
        progress(f"case {case}")
        rows += _RUNNERS[case](args, progress, args.quick)
    return rows


# ---------------------------------------------------------------------------------------------
# Plots.


def plot(rows, path_prefix: str) -> None:
    import matplotlib.pyplot as plt

    def numeric(r, key):
        return isinstance(r.get(key), (int, float)) and r.get(key) is not None

    for case, ylabel in (("scaling_logits", "logits"), ("scaling_linear", "linear head")):
        sel = [r for r in rows if r["case"] == case]
        if not sel:
            continue
        ns = sorted({r["N"] for r in sel})
        vs = sorted({r["V"] for r in sel})
        n_fixed = ns[len(ns) // 2] if len(ns) > 1 else ns[0]
        v_fixed = max(vs, key=lambda v: sum(1 for r in sel if r["V"] == v))
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for impl in sorted({r["impl"] for r in sel}):
            by_v = sorted(
                (r["V"], r["fwdbwd_ms"])
                for r in sel
                if r["impl"] == impl and r["N"] == n_fixed and numeric(r, "fwdbwd_ms")
            )
            by_n = sorted(
                (r["N"], r["temp_bytes"] / 2**20)
                for r in sel
                if r["impl"] == impl and r["V"] == v_fixed and numeric(r, "temp_bytes")
            )
            if by_v:
                axes[0].plot(*zip(*by_v, strict=True), marker="o", label=impl)
            if by_n:
                axes[1].plot(*zip(*by_n, strict=True), marker="o", label=impl)
        axes[0].set(
            xscale="log",
            yscale="log",
            xlabel="V (vocabulary)",
            ylabel="fwd+bwd time [ms]",
            title=f"{ylabel}: time vs V (N={n_fixed})",
        )
        axes[1].set(
            xscale="log",
            yscale="log",
            xlabel="N (tokens)",
            ylabel="temporary memory [MiB]",
            title=f"{ylabel}: temp memory vs N (V={v_fixed})",
        )
        for ax, ticks in ((axes[0], vs), (axes[1], ns)):
            ax.set_xticks(ticks, [str(t) for t in ticks])
            ax.minorticks_off()
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(f"{path_prefix}_{case}.png", dpi=120)
        plt.close(fig)
