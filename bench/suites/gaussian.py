"""Closed-form Gaussian KL: kldiv.gaussian against TensorFlow Probability and distrax, same inputs.

Cases (float32 by default; sizes as ``[batch, D]``):

* ``diag_standard_normal`` ``[65536, 64]``: KL(N(μ, diag e^{lv}) ‖ N(0, I)), the VAE term.
* ``diag_pair`` ``[65536, 64]``: two batched diagonal Gaussians (log-variances).
* ``full_pair`` ``[4096, 64]``: two batched full-covariance Gaussians (Cholesky factors).
* ``full_shared_prior`` ``[4096, 64]``: a batch of full-covariance posteriors against one prior
  ``[D, D]`` (kldiv factors it once and solves the whole batch as one stacked right-hand side).

Peers get the same arrays: ``tfd.MultivariateNormalDiag(μ, exp(lv/2))`` /
``tfd.MultivariateNormalTriL`` with ``tfd.kl_divergence``, and ``distrax.MultivariateNormalDiag`` /
``distrax.MultivariateNormalTri`` with ``.kl_divergence``, all jitted. ``naive-jnp`` (diagonal
cases only) is the one-line textbook formula a user would write; it is shown for reference and is
not a peer.

Columns: ``fwd_ms`` and ``fwdbwd_ms`` (gradient w.r.t. every input) are the minimum over
``--gaussian-rounds`` rounds of the median of ``--repeats`` timed runs. Rounds are interleaved
across implementations in one process: the diagonal cases and the full-covariance forward passes
(the latter in a subprocess with a timeout). Each full-covariance forward+backward runs in its
own fresh process, abandoned after ``--gaussian-timeout`` seconds (on CPU, two batched LAPACK
calls in flight at once can deadlock jaxlib's thread pool, which hangs the peers' gradients; the
``note`` column says so). ``*_vs_best_peer`` is the median over rounds of the time divided by the
fastest of TFP and distrax in the same round (``*_round_ratios``: each round's ratio), or the
ratio of best times where they ran in separate processes; ``speedup_vs_tfp`` (shared prior) is
the median per-round TFP/kldiv forward time. ``temp_MiB`` is XLA's compiled temporary memory of
the forward+backward; ``tiny_rel_err`` is the median relative error in float32 on nearly
identical distributions (KL ≈ 1e-6 per example) against a float64 reference, and ``negatives``
counts values below 0 there.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import jax
import jax.numpy as jnp
import numpy as np

from bench import common
from kldiv import gaussian

NAME = "gaussian"

CASES = ("diag_standard_normal", "diag_pair", "full_pair", "full_shared_prior")
PEERS = ("tfp", "distrax")


def add_arguments(parser) -> None:
    parser.add_argument(
        "--gaussian-diag-shape", default="65536,64", help="batch,D of the diagonal cases"
    )
    parser.add_argument(
        "--gaussian-full-shape", default="4096,64", help="batch,D of the full-covariance cases"
    )
    parser.add_argument("--gaussian-dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument(
        "--gaussian-cases",
        default=",".join(CASES),
        help="comma-separated subset of " + ", ".join(CASES),
    )
    parser.add_argument(
        "--gaussian-rounds",
        type=int,
        default=5,
        help="interleaved timing rounds (ratios: median of per-round ratios)",
    )
    parser.add_argument(
        "--gaussian-no-grad", action="store_true", help="time the forward pass only"
    )
    parser.add_argument(
        "--gaussian-timeout",
        type=int,
        default=120,
        help="seconds before an isolated full-covariance measurement is abandoned",
    )


# ---------------------------------------------------------------------------------------------
# Implementations: case -> impl -> function of the case's arrays.


def _tfd():
    import tensorflow_probability.substrates.jax as tfp

    return tfp.distributions


def _diag_std_fns():
    def kldiv_fn(m, lv):
        return gaussian.kl_standard_normal(m, lv)

    def tfp_fn(m, lv):
        tfd = _tfd()
        d = m.shape[-1]
        p = tfd.MultivariateNormalDiag(m, jnp.exp(0.5 * lv))
        q = tfd.MultivariateNormalDiag(jnp.zeros(d, m.dtype), jnp.ones(d, m.dtype))
        return tfd.kl_divergence(p, q)

    def distrax_fn(m, lv):
        import distrax

        d = m.shape[-1]
        p = distrax.MultivariateNormalDiag(m, jnp.exp(0.5 * lv))
        q = distrax.MultivariateNormalDiag(jnp.zeros(d, m.dtype), jnp.ones(d, m.dtype))
        return p.kl_divergence(q)

    def naive_fn(m, lv):
        return 0.5 * jnp.sum(m * m + jnp.exp(lv) - 1.0 - lv, axis=-1)

    return {"kldiv": kldiv_fn, "tfp": tfp_fn, "distrax": distrax_fn, "naive-jnp": naive_fn}


def _diag_pair_fns():
    def kldiv_fn(mp, lvp, mq, lvq):
        return gaussian.kl_diag(mp, lvp, mq, lvq)

    def tfp_fn(mp, lvp, mq, lvq):
        tfd = _tfd()
        p = tfd.MultivariateNormalDiag(mp, jnp.exp(0.5 * lvp))
        return tfd.kl_divergence(p, tfd.MultivariateNormalDiag(mq, jnp.exp(0.5 * lvq)))

    def distrax_fn(mp, lvp, mq, lvq):
        import distrax

        p = distrax.MultivariateNormalDiag(mp, jnp.exp(0.5 * lvp))
        return p.kl_divergence(distrax.MultivariateNormalDiag(mq, jnp.exp(0.5 * lvq)))

    def naive_fn(mp, lvp, mq, lvq):
        t = lvq - lvp + (jnp.exp(lvp) + (mp - mq) ** 2) * jnp.exp(-lvq) - 1.0
        return 0.5 * jnp.sum(t, axis=-1)

    return {"kldiv": kldiv_fn, "tfp": tfp_fn, "distrax": distrax_fn, "naive-jnp": naive_fn}


def _full_fns():
    def kldiv_fn(mp, lp, mq, lq):
        return gaussian.kl_full(mp, lp, mq, lq)

    def tfp_fn(mp, lp, mq, lq):
        tfd = _tfd()
        p, q = tfd.MultivariateNormalTriL(mp, lp), tfd.MultivariateNormalTriL(mq, lq)
        return tfd.kl_divergence(p, q)

    def distrax_fn(mp, lp, mq, lq):
        import distrax

        p = distrax.MultivariateNormalTri(mp, lp, is_lower=True)
        return p.kl_divergence(distrax.MultivariateNormalTri(mq, lq, is_lower=True))

    return {"kldiv": kldiv_fn, "tfp": tfp_fn, "distrax": distrax_fn}


# ---------------------------------------------------------------------------------------------
# Inputs and float64 references (numpy).


def _tril(rng, batch, d, dtype):
    off = np.tril(rng.normal(scale=0.4 / np.sqrt(d), size=(*batch, d, d)), -1)
    diag = np.exp(rng.normal(scale=0.3, size=(*batch, d)))
    return (off + diag[..., None] * np.eye(d)).astype(dtype)


def _inputs(case, b, d, dtype, seed=0, tiny=False):
    """The case's arrays as numpy; ``tiny`` makes p and q nearly identical (KL ≈ 1e-6)."""
    rng = np.random.default_rng(seed)
    eps = 1e-3 / np.sqrt(d)
    if case == "diag_standard_normal":
        s = eps if tiny else 1.0
        return (s * rng.normal(size=(b, d)), s * rng.normal(size=(b, d)))
    if case == "diag_pair":
        mp, lvp = rng.normal(size=(b, d)), 0.5 * rng.normal(size=(b, d))
        if tiny:
            return mp, lvp, mp + eps * rng.normal(size=(b, d)), lvp + eps * rng.normal(size=(b, d))
        return mp, lvp, rng.normal(size=(b, d)), 0.5 * rng.normal(size=(b, d))
    qbatch = () if case == "full_shared_prior" else (b,)
    mq, lq = rng.normal(size=(*qbatch, d)), _tril(rng, qbatch, d, np.float64)
    if tiny:
        mp = mq + eps * rng.normal(size=(b, d))
        lp = lq + eps * np.tril(rng.normal(size=(b, d, d)))
        return mp, lp, mq, lq
    return rng.normal(size=(b, d)), _tril(rng, (b,), d, np.float64), mq, lq


def _reference(case, arrays):
    """float64 KL with numpy (no kldiv code)."""
    x = [np.asarray(a, np.float64) for a in arrays]
    if case == "diag_standard_normal":
        m, lv = x
        return 0.5 * np.sum(m * m + np.expm1(lv) - lv, axis=-1)
    if case == "diag_pair":
        mp, lvp, mq, lvq = x
        r = lvp - lvq
        return 0.5 * np.sum(np.expm1(r) - r + (mp - mq) ** 2 * np.exp(-lvq), axis=-1)
    mp, lp, mq, lq = x
    lq = np.broadcast_to(lq, lp.shape)
    m = np.linalg.solve(lq, lp)
    delta = np.linalg.solve(lq, (mp - np.broadcast_to(mq, mp.shape))[..., None])[..., 0]
    logdet = 2 * np.sum(
        np.log(np.abs(np.diagonal(lq, axis1=-2, axis2=-1)))
        - np.log(np.abs(np.diagonal(lp, axis1=-2, axis2=-1))),
        axis=-1,
    )
    return 0.5 * (np.sum(m * m, axis=(-2, -1)) - lp.shape[-1] + logdet + np.sum(delta**2, -1))


# ---------------------------------------------------------------------------------------------


def _shape(arg: str) -> tuple[int, int]:
    b, d = (int(v) for v in arg.split(","))
    return b, d


_FACTORIES = {
    "diag_standard_normal": _diag_std_fns,
    "diag_pair": _diag_pair_fns,
    "full_pair": _full_fns,
    "full_shared_prior": _full_fns,
}


def _measure(case, b, d, dtype_name, impls, opts, progress) -> list[dict]:
    """Times ``impls`` of ``case`` in interleaved rounds in this process; one row each.

    ``opts``: repeats, warmup, rounds, and which of "fwd" (forward, with the accuracy columns)
    and "grad" (forward+backward, with the memory columns) to measure. Each row keeps the
    per-round medians (``fwd_rounds_ms``/``fwdbwd_rounds_ms``) so that ratios can be formed per
    round, between implementations timed back to back.
    """
    dtype = jnp.dtype(dtype_name)
    fns = {k: v for k, v in _FACTORIES[case]().items() if k in impls}
    arrays = tuple(jnp.asarray(a, dtype) for a in _inputs(case, b, d, np.float32))
    tiny32 = tuple(
        jnp.asarray(a, jnp.float32) for a in _inputs(case, 256, d, np.float32, seed=1, tiny=True)
    )
    tiny_ref = _reference(case, [np.asarray(a) for a in tiny32])
    argnums = tuple(range(len(arrays)))
    modes = [m for m in ("fwd", "grad") if opts[m]]
    jitted = {}
    for impl, fn in fns.items():
        progress(f"{case} [{b}, {d}]: compiling {impl}")
        jitted[impl] = {
            "fwd": jax.jit(fn),
            "grad": jax.jit(jax.value_and_grad(lambda *a, f=fn: jnp.sum(f(*a)), argnums)),
        }
        for mode in modes:
            jax.block_until_ready(jitted[impl][mode](*arrays))
    rounds = {impl: {mode: [] for mode in modes} for impl in fns}
    for rnd in range(opts["rounds"]):
        for impl, compiled in jitted.items():
            progress(f"{case}: timing {impl} (round {rnd + 1}/{opts['rounds']})")
            for mode in modes:
                t = common.timeit(
                    compiled[mode], *arrays, repeats=opts["repeats"], warmup=opts["warmup"]
                )
                rounds[impl][mode].append(1e3 * t)
    rows = []
    for impl, fn in fns.items():
        row = {"impl": impl}
        if opts["fwd"]:
            vals = np.asarray(jax.jit(fn)(*tiny32), np.float64)
            row["fwd_ms"] = min(rounds[impl]["fwd"])
            row["fwd_rounds_ms"] = rounds[impl]["fwd"]
            row["tiny_rel_err"] = float(np.median(np.abs(vals - tiny_ref) / tiny_ref))
            row["negatives"] = int((vals < 0).sum())
        if opts["grad"]:
            grad_fn = jax.value_and_grad(lambda *a, f=fn: jnp.sum(f(*a)), argnums)
            temp = common.temp_bytes(grad_fn, *arrays)
            row["fwdbwd_ms"] = min(rounds[impl]["grad"])
            row["fwdbwd_rounds_ms"] = rounds[impl]["grad"]
            row["temp_MiB"] = None if temp is None else temp / 2**20
            row["temp_bytes"] = temp
        rows.append(row)
    return rows


def _child(conn, case, b, d, dtype_name, impls, opts) -> None:
    import sys

    def progress(message):
        print(f"          gaussian (subprocess): {message}", file=sys.stderr, flush=True)

    try:
        conn.send(_measure(case, b, d, dtype_name, impls, opts, progress))
    except Exception as err:  # reported as a row note
        conn.send(f"{type(err).__name__}: {err}")
    conn.close()


def _measure_isolated(case, b, d, dtype_name, impls, opts, timeout, progress) -> list[dict]:
    """``_measure`` in fresh processes, each abandoned after ``timeout`` seconds.

    Batched LAPACK calls (triangular solves) on CPU can deadlock jaxlib's thread pool when two
    are in flight at once, which hangs the peers' forward+backward of the full-covariance cases.
    So the forward passes of all implementations run interleaved in one process (each jitted
    forward issues one solve at a time), and each forward+backward in its own process; what
    hangs is recorded in the ``note`` column and the run goes on.
    """
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    rows = {impl: {"impl": impl} for impl in impls}
    notes = {impl: [] for impl in impls}
    jobs = [("fwd", list(impls))] if opts["fwd"] else []
    jobs += [("grad", [impl]) for impl in impls] if opts["grad"] else []
    for mode, group in jobs:
        sub = dict(opts, fwd=mode == "fwd", grad=mode == "grad")
        recv, send = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_child, args=(send, case, b, d, dtype_name, group, sub))
        proc.start()
        send.close()
        got = recv.recv() if recv.poll(timeout) else None
        proc.join(5)
        if proc.is_alive():
            proc.kill()
            proc.join()
        if isinstance(got, list):
            for r in got:
                rows[r["impl"]].update(r)
            continue
        label = "forward" if mode == "fwd" else "forward+backward"
        note = got if isinstance(got, str) else f"{label}: no result in {timeout} s (hung)"
        progress(f"{case}: {', '.join(group)}: {note}")
        for impl in group:
            notes[impl].append(note)
    for impl, row in rows.items():
        if notes[impl]:
            row["note"] = "; ".join(notes[impl])
    return list(rows.values())


def _ratios_to_best_peer(case_rows, key) -> None:
    """``<key>_vs_best_peer``: each implementation's time over the fastest peer's.

    Where the peers were timed in the same rounds (interleaved, same process) the ratio is formed
    per round against that round's fastest peer and the median over rounds is reported, so a
    disturbance that slows one round slows both sides of its ratio; otherwise (separate
    processes) it is the ratio of the best times.
    """
    out = key.replace("_ms", "_vs_best_peer")
    peers = [r for r in case_rows if r["impl"] in PEERS and r.get(key) is not None]
    rounds_key = key.replace("_ms", "_rounds_ms")
    for r in case_rows:
        r[out] = None
        if not peers or r.get(key) is None:
            continue
        paired = [p.get(rounds_key) for p in peers] + [r.get(rounds_key)]
        n = len(paired[0]) if paired[0] else 0
        if n and all(x is not None and len(x) == n for x in paired):
            best = [min(p[rounds_key][i] for p in peers) for i in range(n)]
            per_round = [t / bt for t, bt in zip(r[rounds_key], best, strict=True)]
            r[out] = float(np.median(per_round))
            r[out.replace("_vs_best_peer", "_round_ratios")] = [round(x, 3) for x in per_round]
        else:
            r[out] = r[key] / min(p[key] for p in peers)


def run(args, progress) -> list[dict]:
    diag_shape = (4096, 32) if args.quick else _shape(args.gaussian_diag_shape)
    full_shape = (256, 16) if args.quick else _shape(args.gaussian_full_shape)
    wanted = [c for c in args.gaussian_cases.split(",") if c]
    unknown = sorted(set(wanted) - set(CASES))
    if unknown:
        raise ValueError(f"unknown gaussian cases {unknown}; available: {', '.join(CASES)}")
    opts = {
        "repeats": args.repeats,
        "warmup": args.warmup,
        "rounds": args.gaussian_rounds,
        "fwd": True,
        "grad": not args.gaussian_no_grad,
    }
    rows = []
    for case in wanted:
        b, d = diag_shape if case.startswith("diag") else full_shape
        impls = list(_FACTORIES[case]())
        if case.startswith("diag"):
            case_rows = _measure(case, b, d, args.gaussian_dtype, impls, opts, progress)
        else:  # LAPACK-backed: subprocesses with a timeout (see _measure_isolated)
            progress(f"{case} [{b}, {d}]: in subprocesses")
            case_rows = _measure_isolated(
                case, b, d, args.gaussian_dtype, impls, opts, args.gaussian_timeout, progress
            )
        shape = f"[{b}, {d}]" + (" vs [D, D] prior" if case == "full_shared_prior" else "")
        for r in case_rows:
            r.update(case=case, shape=shape, dtype=args.gaussian_dtype)
        for key in ("fwd_ms", "fwdbwd_ms"):
            _ratios_to_best_peer(case_rows, key)
        for r in case_rows:
            r["ratio_vs_fastest_peer"] = r.get("fwd_vs_best_peer")
            if case == "full_shared_prior" and r["impl"] == "kldiv":
                tfp = next((t for t in case_rows if t["impl"] == "tfp"), {})
                r["speedup_vs_tfp"] = _speedup(r, tfp)
        rows.extend(case_rows)
    columns = ["case", "impl", "shape", "dtype", "fwd_ms", "fwdbwd_ms", "fwd_vs_best_peer"]
    columns += ["fwdbwd_vs_best_peer", "ratio_vs_fastest_peer", "speedup_vs_tfp"]
    columns += ["fwd_round_ratios", "fwdbwd_round_ratios", "temp_MiB", "temp_bytes"]
    columns += ["tiny_rel_err", "negatives", "note"]
    return [{c: r.get(c) for c in columns} for r in rows]


def _speedup(row, tfp_row) -> float | None:
    """TFP's forward time over kldiv's: median of per-round ratios (interleaved rounds)."""
    mine, theirs = row.get("fwd_rounds_ms"), tfp_row.get("fwd_rounds_ms")
    if not mine or not theirs or len(mine) != len(theirs):
        return None
    return float(np.median([t / m for m, t in zip(mine, theirs, strict=True)]))


def plot(rows, path) -> None:
    import matplotlib.pyplot as plt

    cases = list(dict.fromkeys(r["case"] for r in rows))
    if not cases:
        return
    fig, axes = plt.subplots(1, len(cases), figsize=(4.2 * len(cases), 4), squeeze=False)
    for ax, case in zip(axes[0], cases, strict=True):
        sel = [r for r in rows if r["case"] == case]
        x = np.arange(len(sel))
        ax.bar(x - 0.2, [r["fwd_ms"] or 0 for r in sel], 0.4, label="forward")
        if any(r.get("fwdbwd_ms") is not None for r in sel):
            ax.bar(x + 0.2, [r["fwdbwd_ms"] or 0 for r in sel], 0.4, label="forward+backward")
        for i, r in enumerate(sel):
            if r.get("fwd_ms") is None:
                ax.text(i, 0, "no result", rotation=90, ha="center", va="bottom", fontsize=8)
        ax.set_xticks(x, [r["impl"] for r in sel], rotation=30, ha="right")
        ax.set_title(f"{case}\n{sel[0]['shape']} {sel[0]['dtype']}", fontsize=9)
        ax.set_ylabel("median time (ms)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    out = path if str(path).endswith(".png") else f"{path}.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
