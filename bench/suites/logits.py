"""Logits-level KL, KL(softmax(teacher) ‖ softmax(student)), against every peer in one run.

Peers: the optax composition (``jax.nn.log_softmax`` of both + ``optax.losses.
kl_divergence_with_log_targets``), ``torch.nn.functional.kl_div(..., log_target=True)`` (CPU
build on CPU), ejkernel's ``fused_kl_divergence`` (platform ``"xla"``; ``"tilelang"`` on GPU
where installed), Liger-Kernel's ``LigerKLDIVLoss`` (GPU only). kldiv: every ``impl`` of
``kldiv.kl_from_logits``.

Columns: forward and forward+backward (gradients w.r.t. both logits) median times, the ratio
of each to the optax composition, compiled temporary memory of the jitted forward+backward and
its ratio to optax, float32 accuracy on nearly equal distributions (median relative error
against a float64 reference at KL ≈ 1e-8, and the count of negative values), and whether a
vocabulary entry masked to −inf in both inputs gives NaN (value or gradient). For kldiv also
the student gradient alone: ``jax.grad`` of the rows' sum w.r.t. the student logits
(``fwdbwd_student_ms``, a cotangent of 1 per row), and the value with that gradient of the rows'
mean (``student_mean_value_ms``: a distillation step's loss, cotangent 1/N), each against
``floor-1out``; and the forward+backward of both gradients at a temperature
(``fwdbwd_T_ms``, ``--logits-temperature``, default 2) against ``floor-2out``.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import matplotlib

matplotlib.use("Agg")

import jax
import jax.numpy as jnp
import numpy as np

import kldiv
from bench import common

NAME = "logits"


def add_arguments(parser) -> None:
    parser.add_argument("--logits-n", type=int, default=1024, help="rows (tokens)")
    parser.add_argument("--logits-v", type=int, default=32768, help="vocabulary size")
    parser.add_argument("--logits-dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument(
        "--logits-temperature",
        type=float,
        default=2.0,
        help="the temperature of kldiv's tempered forward+backward rows (fwdbwd_T_ms)",
    )
    parser.add_argument(
        "--logits-impls",
        default="all",
        help="comma-separated from optax,torch,ejkernel,ejkernel-tilelang,liger,"
        "kldiv-<impl> ('all': every one available)",
    )


# ---------------------------------------------------------------------------------------------
# Candidates: name -> per-row function (teacher_logits, student_logits) -> [N] float32.


def _optax_rows(t, s):
    import optax

    return optax.losses.kl_divergence_with_log_targets(
        jax.nn.log_softmax(s.astype(jnp.float32)), jax.nn.log_softmax(t.astype(jnp.float32))
    )


def _ejkernel_rows(platform):
    from ejkernel.modules.operations.fused_kl_divergence import fused_kl_divergence

    def rows(t, s):
        out = fused_kl_divergence(s, t, reduction="none", platform=platform)
        return out.loss

    return rows


def _kldiv_rows(impl, temperature=1.0):
    def rows(t, s):
        return kldiv.kl_from_logits(t, s, impl=impl, temperature=temperature)

    return rows


def _jax_candidates(gpu: bool) -> dict:
    cands = {"optax": _optax_rows}
    try:
        import ejkernel  # noqa: F401

        cands["ejkernel-xla"] = _ejkernel_rows("xla")
        if gpu:
            cands["ejkernel-tilelang"] = _ejkernel_rows("tilelang")
    except ImportError:
        pass
    for impl in kldiv.discrete.LOGIT_IMPLS:
        if impl == "pallas" and not gpu:
            continue  # interpret mode off-GPU is a correctness tool, not a contender
        cands[f"kldiv-{impl}"] = _kldiv_rows(impl)
    return cands


# ---------------------------------------------------------------------------------------------


def _inputs(n, v, dtype, seed=0):
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    t = (2.0 * jax.random.normal(k1, (n, v), jnp.float32)).astype(dtype)
    s = (t.astype(jnp.float32) + 0.5 * jax.random.normal(k2, (n, v), jnp.float32)).astype(dtype)
    return t, s


def _near_inputs(n, v, seed=1):
    """float32 logits whose softmaxes are nearly equal: KL ≈ 1e-8 per row."""
    rng = np.random.default_rng(seed)
    t = (2.0 * rng.standard_normal((n, v))).astype(np.float32)
    s = (t + 1.4e-4 * rng.standard_normal((n, v))).astype(np.float32)
    return t, s


def _reference_f64(t, s):
    def log_softmax(x):
        x = x.astype(np.float64)
        m = x.max(-1, keepdims=True)
        return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))

    lt, ls = log_softmax(t), log_softmax(s)
    return (np.exp(lt) * (lt - ls)).sum(-1)


def _masked_inputs(v):
    t = np.zeros((2, v), np.float32)
    s = np.zeros((2, v), np.float32)
    t[:, 0] = s[:, 0] = -np.inf  # a masked vocabulary entry, −inf in both
    s[:, 1] = 1.0
    return jnp.asarray(t), jnp.asarray(s)


def _accuracy(rows_fn, t_near, s_near, ref, t_mask, s_mask):
    vals = np.asarray(jax.jit(rows_fn)(jnp.asarray(t_near), jnp.asarray(s_near)), np.float64)
    rel = np.median(np.abs(vals - ref) / ref)
    negatives = int((vals < 0).sum())
    val_m, grads = jax.value_and_grad(lambda a, b: jnp.sum(rows_fn(a, b)), argnums=(0, 1))(
        t_mask, s_mask
    )
    nan = bool(np.isnan(np.asarray(val_m)) or any(np.isnan(np.asarray(g)).any() for g in grads))
    return float(rel), negatives, nan


def _torch_row(t, s, args, progress):
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(os.cpu_count() or 1)
    tt = torch.from_numpy(np.array(t, np.float32))
    ts = torch.from_numpy(np.array(s, np.float32))

    def fwd(a, b):
        with torch.no_grad():
            return F.kl_div(
                F.log_softmax(b, -1), F.log_softmax(a, -1), log_target=True, reduction="none"
            ).sum(-1)

    def fwdbwd(a, b):
        a = a.detach().requires_grad_(True)
        b = b.detach().requires_grad_(True)
        loss = F.kl_div(
            F.log_softmax(b, -1), F.log_softmax(a, -1), log_target=True, reduction="sum"
        )
        loss.backward()
        return a.grad, b.grad

    progress("torch: timing")
    fwd_s = common.timeit_torch(fwd, tt, ts, repeats=args.repeats, warmup=args.warmup)
    fb_s = common.timeit_torch(fwdbwd, tt, ts, repeats=args.repeats, warmup=args.warmup)
    tn, sn = _near_inputs(256, min(args.logits_v, 4096))
    ref = _reference_f64(tn, sn)
    vals = fwd(torch.from_numpy(tn), torch.from_numpy(sn)).numpy().astype(np.float64)
    rel = float(np.median(np.abs(vals - ref) / ref))
    tm, sm = (torch.from_numpy(np.array(x)) for x in _masked_inputs(8))
    tm.requires_grad_(True)
    sm.requires_grad_(True)
    val = F.kl_div(F.log_softmax(sm, -1), F.log_softmax(tm, -1), log_target=True, reduction="sum")
    val.backward()
    nan = bool(torch.isnan(val) or torch.isnan(tm.grad).any() or torch.isnan(sm.grad).any())
    return {
        "impl": "torch",
        "fwd_ms": 1e3 * fwd_s,
        "fwdbwd_ms": 1e3 * fb_s,
        "temp_MiB": None,
        "median_rel_err": rel,
        "negatives": int((vals < 0).sum()),
        "nan_at_masked": nan,
    }


def run(args, progress) -> list[dict]:
    gpu = jax.default_backend() == "gpu"
    n, v = (128, 4096) if args.quick else (args.logits_n, args.logits_v)
    dtype = jnp.dtype(args.logits_dtype)
    t, s = _inputs(n, v, dtype)
    tn, sn = _near_inputs(256, min(v, 4096))
    ref = _reference_f64(tn, sn)
    tm, sm = _masked_inputs(8)
    cands = _jax_candidates(gpu)
    wanted = None if args.logits_impls == "all" else set(args.logits_impls.split(","))
    cands = {k: f for k, f in cands.items() if wanted is None or k in wanted}
    timed: dict[str, Callable] = {}
    for name, rows_fn in cands.items():
        progress(f"{name}: compiling [{n}, {v}] {dtype}")
        timed[f"{name}/fwd"] = jax.jit(rows_fn)
        timed[f"{name}/fwdbwd"] = jax.jit(
            jax.value_and_grad(lambda a, b, f=rows_fn: jnp.sum(f(a, b)), argnums=(0, 1))
        )
        if name.startswith("kldiv-"):
            timed[f"{name}/student"] = jax.jit(
                jax.grad(lambda a, b, f=rows_fn: jnp.sum(f(a, b)), argnums=1)
            )
            # the distillation loss as a training step forms it: the value too, and a mean
            # over the rows (a cotangent of 1/N, not 1: the backward pass scales the gradient)
            timed[f"{name}/student_mean"] = jax.jit(
                jax.value_and_grad(lambda a, b, f=rows_fn: jnp.mean(f(a, b)), argnums=1)
            )
            # at a temperature (distillation's usual T > 1): the error-free centred difference
            # and the compensated tempered exponentials that keep the accuracy there
            tempered = _kldiv_rows(name.removeprefix("kldiv-"), args.logits_temperature)
            timed[f"{name}/fwdbwd_T"] = jax.jit(
                jax.value_and_grad(lambda a, b, f=tempered: jnp.sum(f(a, b)), argnums=(0, 1))
            )
    for name, f in _floors().items():
        timed[f"{name}/fwdbwd"] = f
    timed["floor-2out-reused/fwdbwd"] = _ReusedOutputs(t, s)
    progress(f"timing {len(timed)} functions in {args.repeats} interleaved rounds")
    seconds = common.timeit_interleaved(timed, t, s, repeats=args.repeats, warmup=args.warmup)
    ms = {k: 1e3 * sec for k, sec in seconds.items()}
    rows = []
    for name, rows_fn in cands.items():
        temp = common.temp_bytes(
            jax.value_and_grad(lambda a, b, f=rows_fn: jnp.sum(f(a, b)), argnums=(0, 1)), t, s
        )
        progress(f"{name}: accuracy and masked-entry check")
        rel, neg, nan = _accuracy(rows_fn, tn, sn, ref, tm, sm)
        row = {
            "impl": name,
            "fwd_ms": ms[f"{name}/fwd"],
            "fwdbwd_ms": ms[f"{name}/fwdbwd"],
            "temp_MiB": None if temp is None else temp / 2**20,
            "median_rel_err": rel,
            "negatives": neg,
            "nan_at_masked": nan,
        }
        if name.startswith("kldiv-"):
            row["fwdbwd_student_ms"] = ms[f"{name}/student"]
            row["student_mean_value_ms"] = ms[f"{name}/student_mean"]
            row["fwdbwd_T_ms"] = ms[f"{name}/fwdbwd_T"]
        rows.append(row)
    floors = {name: ms[f"{name}/fwdbwd"] for name in _floors()}
    for name, floor_ms in floors.items():
        note = "physical floor (same bytes)"
        if name == "floor-read":
            # A forward pass that keeps nothing of size N·V must read the inputs again in the
            # backward: its forward+backward cannot beat floor-read + floor-2out (floor-read +
            # floor-1out for the student gradient only); these bounds as ratios to the floors.
            both = (floor_ms + floors["floor-2out"]) / floors["floor-2out"]
            student = (floor_ms + floors["floor-1out"]) / floors["floor-1out"]
            note = f"forward floor; recompute bound vs floor: {both:.2f} / {student:.2f}"
        rows.append({"impl": name, "fwdbwd_ms": floor_ms, "note": note})
    reused = ms["floor-2out-reused/fwdbwd"]
    fresh = floors["floor-2out"]
    rows.append(
        {
            "impl": "floor-2out-reused",
            "fwdbwd_ms": reused,
            "note": f"floor-2out into reused (donated) buffers: fresh outputs cost "
            f"{fresh - reused:.1f} ms ({(fresh - reused) / fresh:.0%} of floor-2out)",
        }
    )
    for r in rows:
        if r["impl"].startswith("kldiv-"):
            r["fwd_vs_floor"] = r["fwd_ms"] / floors["floor-read"]
            r["fwdbwd_vs_floor"] = r["fwdbwd_ms"] / floors["floor-2out"]
            r["student_vs_floor"] = r["fwdbwd_student_ms"] / floors["floor-1out"]
            r["student_mean_value_vs_floor"] = r["student_mean_value_ms"] / floors["floor-1out"]
            r["fwdbwd_T_vs_floor"] = r["fwdbwd_T_ms"] / floors["floor-2out"]
    if wanted is None or "torch" in wanted:
        try:
            rows.append(_torch_row(t.astype(jnp.float32), s.astype(jnp.float32), args, progress))
        except ImportError:
            progress("torch not installed: skipped")
    if wanted is None or "liger" in wanted:
        rows.append(_liger_row(gpu))
    base = next((r for r in rows if r["impl"] == "optax"), None)
    for r in rows:
        r["shape"] = f"[{n}, {v}] {dtype}"
        if base is not None and r.get("fwd_ms") is not None:
            r["fwd_vs_optax"] = r["fwd_ms"] / base["fwd_ms"]
            r["fwdbwd_vs_optax"] = r["fwdbwd_ms"] / base["fwdbwd_ms"]
            if r.get("temp_MiB") is not None and base.get("temp_MiB"):
                r["temp_vs_optax"] = r["temp_MiB"] / base["temp_MiB"]
    return rows


def _floors() -> dict:
    """The physical floors, timed with the candidates: a jitted function that reads both inputs,
    computes one exp of each element and writes two outputs of the same size (``floor-2out``:
    both gradients), its one-output variant (``floor-1out``: the student gradient only), and
    its variant that writes one number per row (``floor-read``: the floor of a forward pass)."""

    def exp32(x):
        return jnp.exp(x.astype(jnp.float32))

    return {
        "floor-2out": jax.jit(lambda a, b: (exp32(a), exp32(b))),
        "floor-1out": jax.jit(lambda a, b: exp32(a) + exp32(b)),
        "floor-read": jax.jit(lambda a, b: jnp.sum(exp32(a) + exp32(b), -1)),
    }


class _ReusedOutputs:
    """``floor-2out`` writing into the buffers of its previous call (donated), not into freshly
    allocated ones: the same bytes read and written, without the cost of first touching new
    output pages (on a VM, page faults), which every function that returns fresh ``[N, V]``
    arrays (gradients) pays and the floors therefore include. Called as ``f(a, b)``."""

    def __init__(self, a, b):
        def exp32(x):
            return jnp.exp(x.astype(jnp.float32))

        self._f = jax.jit(
            lambda a, b, _oa, _ob: (exp32(a), exp32(b)), donate_argnums=(2, 3), keep_unused=True
        )
        self._out = (jnp.zeros(a.shape, jnp.float32), jnp.zeros(b.shape, jnp.float32))

    def __call__(self, a, b):
        self._out = self._f(a, b, *self._out)
        return self._out


def _liger_row(gpu: bool) -> dict:
    note = "not measured (no GPU)"
    if gpu:
        note = "not measured (needs liger-kernel with torch CUDA + Triton on this machine)"
    return {"impl": "liger", "fwd_ms": None, "fwdbwd_ms": None, "note": note}


def plot(rows, path_prefix: str) -> None:
    import matplotlib.pyplot as plt

    timed = [r for r in rows if r.get("fwdbwd_ms") is not None]
    if not timed:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    names = [r["impl"] for r in timed]
    x = np.arange(len(timed))
    axes[0].bar(x - 0.2, [r.get("fwd_ms") or 0 for r in timed], 0.4, label="forward")
    axes[0].bar(x + 0.2, [r["fwdbwd_ms"] for r in timed], 0.4, label="forward+backward")
    axes[0].set_xticks(x, names, rotation=30, ha="right")
    axes[0].set_ylabel("median time (ms)")
    axes[0].legend()
    axes[0].set_title(f"KL from logits, {timed[0]['shape']}")
    mem = [r for r in timed if r.get("temp_MiB") is not None]
    axes[1].bar(range(len(mem)), [r["temp_MiB"] for r in mem])
    axes[1].set_xticks(range(len(mem)), [r["impl"] for r in mem], rotation=30, ha="right")
    axes[1].set_ylabel("compiled temporary memory (MiB), fwd+bwd")
    fig.tight_layout()
    fig.savefig(f"{path_prefix}.png", dpi=110)
    plt.close(fig)
