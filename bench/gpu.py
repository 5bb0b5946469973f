"""One command for a GPU machine: ``make gpu-check`` (``python -m bench.gpu``).

Runs, in one process and within a few minutes on one H100/H200 (compilation included):

1. the discrete and fused test suites with every implementation on the GPU (a pytest subprocess:
   tests/test_discrete.py, tests/test_fused.py, tests/test_properties.py);
2. a bandwidth probe: a jitted copy of the same bytes as the inputs (read + write);
3. ``kl_from_logits`` at bf16 [8192, 131072] and [4096, 151936], forward and forward+backward
   (student gradient): kldiv (pallas, xla, chunked, auto), optax, ejkernel (XLA path; TileLang
   where installed), ``torch.nn.functional.kl_div`` and Liger-Kernel's ``LigerKLDIVLoss`` (each
   with the ``log_softmax`` it needs), timed the same way (median after warm-up), values and
   gradients checked against kldiv's XLA path on the same inputs;
4. ``fused_linear_kl`` against Liger's ``LigerFusedLinearJSD`` (β = 0 and 1 are forward and reverse
   KL in Liger's definition) at bf16 BT = 8192, H = 4096, V = 128256: time and peak memory;
5. a printed table with the lower bound of each row at the measured copy bandwidth (bytes that
   must be read and written, divided by it), and ``bench/results/gpu.json``;
6. the GPU targets judged from these rows (:func:`targets`): the forward of ``kldiv-pallas`` and
   ``kldiv-auto`` at ≥ 80% of the copy bandwidth, their forward+backward faster than Liger and
   ejkernel, ``fused_linear_kl`` faster than ``LigerFusedLinearJSD`` with no more peak memory
   (kldiv's peak from the compiled program's memory analysis: arguments + outputs +
   temporaries; Liger's from ``torch.cuda.max_memory_allocated``). Each is met, not met, or "not
   measured" with the missing row named: never guessed.

The GPU machine has no network: ``make gpu-wheels`` (where PyPI is reachable) puts the peers'
wheels in ``.whl/``; there, ``python3 -m pip install --no-index --no-deps --target /tmp/site
.whl/*.whl`` and ``PYTHONPATH=/tmp/site make gpu-check`` (the machine's own Python with JAX for
CUDA; no virtual environment is built). A peer that is missing or fails gives a row marked "not
installed" or "failed: …", never a crash. The JSON is rewritten after every section, and the
test subprocess stops after ``--test-timeout`` seconds, so that a run cut short by a time limit
keeps what it measured.

``--dry-run`` runs the same code on tiny shapes on whatever backend is there (Pallas in interpret
mode off GPU), without the test subprocess: ``make test`` runs it so that this script cannot rot.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import traceback

# JAX takes 75% of the GPU's memory at its first use unless told otherwise; torch (the peers) then
# runs out of memory beside it, and JAX's peak-memory figures would describe the pool, not the
# computation. Set before jax is imported; the test subprocess inherits it.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import kldiv  # noqa: E402
from bench import common  # noqa: E402

FULL_SHAPES = ((8192, 131072), (4096, 151936))
DRY_SHAPES = ((16, 512),)
FULL_LINEAR = (8192, 4096, 128256)
DRY_LINEAR = (64, 32, 256)
KLDIV_IMPLS = ("pallas", "xla", "chunked", "auto")


def _bandwidth(n_bytes: int, repeats: int) -> float:
    """Bytes per second of a jitted copy (read + write) of ``n_bytes``."""
    x = jnp.ones((n_bytes // 2,), jnp.bfloat16)
    f = jax.jit(lambda x: x * jnp.bfloat16(1.0) + jnp.bfloat16(0.0))
    t = common.timeit(f, x, repeats=repeats)
    return 2 * n_bytes / t


def _kldiv_fns(impl):
    def fwd(t, s):
        return jnp.sum(kldiv.kl_from_logits(t, s, impl=impl))

    return jax.jit(fwd), jax.jit(jax.value_and_grad(fwd, argnums=1))


def _optax_fns():
    import optax

    def fwd(t, s):
        lt = jax.nn.log_softmax(t.astype(jnp.float32))
        ls = jax.nn.log_softmax(s.astype(jnp.float32))
        return jnp.sum(optax.losses.kl_divergence_with_log_targets(ls, lt))

    return jax.jit(fwd), jax.jit(jax.value_and_grad(fwd, argnums=1))


def _ejkernel_fns(platform):
    from ejkernel.modules.operations.fused_kl_divergence import fused_kl_divergence

    def fwd(t, s):
        # ejkernel takes (student, teacher) and returns an output record; .loss per row
        return jnp.sum(fused_kl_divergence(s, t, reduction="none", platform=platform).loss)

    return jax.jit(fwd), jax.jit(jax.value_and_grad(fwd, argnums=1))


def _torch_fns(liger: bool):
    import torch

    if liger:
        from liger_kernel.transformers import LigerKLDIVLoss

        loss = LigerKLDIVLoss(reduction="sum", log_target=True)
    else:

        def loss(inp, target):
            return torch.nn.functional.kl_div(inp, target, reduction="sum", log_target=True)

    def fwd(t, s):
        return loss(torch.log_softmax(s.float(), -1), torch.log_softmax(t.float(), -1))

    def fwdbwd(t, s):
        s = s.detach().requires_grad_(True)
        out = fwd(t, s)
        out.backward()
        return out, s.grad

    return fwd, fwdbwd


def _to_torch(x):
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.from_dlpack(np.asarray(x.astype(jnp.float32))).to(device).to(torch.bfloat16)


def _time_row(name, make, t, s, ref, args, is_torch=False):
    """Times forward and forward+backward of one implementation; checks it against ``ref``."""
    row = {"impl": name}
    try:
        fwd, fwdbwd = make()
    except ImportError as e:
        return {**row, "note": f"not installed ({e.name or e})"}
    try:
        if is_torch:
            tt, st = _to_torch(t), _to_torch(s)
            row["fwd_ms"] = 1e3 * common.timeit_torch(fwd, tt, st, repeats=args.repeats)
            row["fwdbwd_ms"] = 1e3 * common.timeit_torch(fwdbwd, tt, st, repeats=args.repeats)
            val, grad = fwdbwd(tt, st)
            val, grad = float(val.detach()), np.asarray(grad.float().cpu())
        else:
            row["fwd_ms"] = 1e3 * common.timeit(fwd, t, s, repeats=args.repeats)
            row["fwdbwd_ms"] = 1e3 * common.timeit(fwdbwd, t, s, repeats=args.repeats)
            val, grad = fwdbwd(t, s)
            val, grad = float(val), np.asarray(grad, np.float32)
    except Exception as e:  # a failing peer is a row, not a crash
        traceback.print_exc(file=sys.stderr)
        return {**row, "note": f"failed: {type(e).__name__}: {str(e)[:120]}"}
    ref_val, ref_grad = ref
    row["value_rel_err"] = abs(val - ref_val) / max(abs(ref_val), 1e-30)
    row["grad_max_err"] = float(
        np.max(np.abs(grad - ref_grad)) / max(np.max(np.abs(ref_grad)), 1e-30)
    )
    return row


def _logits_rows(shape, bw, args, progress) -> list[dict]:
    n, v = shape
    key_t, key_s = jax.random.split(jax.random.key(0))
    t = (3 * jax.random.normal(key_t, (n, v), jnp.float32)).astype(jnp.bfloat16)
    s = (t.astype(jnp.float32) + jax.random.normal(key_s, (n, v))).astype(jnp.bfloat16)
    _, xla_grad = _kldiv_fns("xla")
    ref_val, ref_grad = xla_grad(t, s)
    ref = (float(ref_val), np.asarray(ref_grad, np.float32))
    in_bytes = 2 * n * v * 2  # both bf16 inputs
    floors = {"fwd": in_bytes / bw, "fwdbwd": (2 * in_bytes + n * v * 2) / bw}
    cands = [(f"kldiv-{impl}", lambda impl=impl: _kldiv_fns(impl), False) for impl in KLDIV_IMPLS]
    cands += [
        ("optax", _optax_fns, False),
        ("ejkernel-xla", lambda: _ejkernel_fns("xla"), False),
        ("ejkernel-tilelang", lambda: _ejkernel_fns("tilelang"), False),
        ("torch.kl_div", lambda: _torch_fns(False), True),
        ("liger.LigerKLDIVLoss", lambda: _torch_fns(True), True),
    ]
    rows = []
    for name, make, is_torch in cands:
        progress(f"[{n}, {v}] {name}")
        row = {
            "case": f"kl_from_logits bf16 [{n}, {v}]",
            **_time_row(name, make, t, s, ref, args, is_torch),
        }
        row["fwd_floor_ms"] = 1e3 * floors["fwd"]
        row["fwdbwd_floor_ms"] = 1e3 * floors["fwdbwd"]
        if row.get("fwd_ms"):
            row["fwd_bw_fraction"] = floors["fwd"] * 1e3 / row["fwd_ms"]
        rows.append(row)
    return rows


def _linear_rows(shape, args, progress) -> list[dict]:
    n, h, v = shape
    keys = jax.random.split(jax.random.key(1), 4)
    ht, hs = (jax.random.normal(k, (n, h), jnp.bfloat16) for k in keys[:2])
    wt, ws = (
        (jax.random.normal(k, (h, v), jnp.float32) / np.sqrt(h)).astype(jnp.bfloat16)
        for k in keys[2:]
    )
    rows = []
    for direction, beta in (("forward", 0.0), ("reverse", 1.0)):
        case = f"fused_linear_kl {direction} bf16 BT={n} H={h} V={v}"

        # every array an argument: a closed-over teacher head would be baked into the program
        # as a constant (1 GiB at the full shape)
        def loss(ht, wt, hs, ws, direction=direction):
            return kldiv.fused_linear_kl(ht, wt, hs, ws, reduction="mean", direction=direction)

        step = jax.value_and_grad(loss, argnums=(2, 3))
        progress(case)
        try:
            compiled = jax.jit(step).lower(ht, wt, hs, ws).compile()
            ms = 1e3 * common.timeit(compiled, ht, wt, hs, ws, repeats=args.repeats)
            memory = common.compiled_memory(compiled) or {}
            row = {"case": case, "impl": "kldiv", "fwdbwd_ms": ms}
            for key in ("temp", "peak"):
                row[f"{key}_MiB"] = memory[key] / 2**20 if key in memory else None
            rows.append(row)
        except Exception as e:
            traceback.print_exc(file=sys.stderr)
            rows.append(
                {
                    "case": case,
                    "impl": "kldiv",
                    "note": f"failed: {type(e).__name__}: {str(e)[:120]}",
                }
            )
        rows.append({"case": case, **_liger_linear(ht, wt, hs, ws, beta, args)})
    return rows


def _liger_linear(ht, wt, hs, ws, beta, args) -> dict:
    try:
        import torch
        from liger_kernel.transformers import LigerFusedLinearJSD
    except ImportError as e:
        return {"impl": "liger.LigerFusedLinearJSD", "note": f"not installed ({e.name or e})"}
    try:
        jsd = LigerFusedLinearJSD(jsd_beta=beta)
        th, tw = _to_torch(ht), _to_torch(wt.T)
        sh, sw = _to_torch(hs).requires_grad_(True), _to_torch(ws.T).requires_grad_(True)

        def step():
            out = jsd(sh, sw, th, tw)
            out.backward()
            return out

        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        ms = 1e3 * common.timeit_torch(step, repeats=args.repeats)
        peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
        return {"impl": "liger.LigerFusedLinearJSD", "fwdbwd_ms": ms, "peak_MiB": peak}
    except Exception as e:
        return {
            "impl": "liger.LigerFusedLinearJSD",
            "note": f"failed: {type(e).__name__}: {str(e)[:120]}",
        }


# The GPU targets (bf16, one run, same inputs): the forward's share of the copy bandwidth, and the
# peers that forward+backward must beat (ejkernel's TileLang path only where it was measured).
FWD_BANDWIDTH_TARGET = 0.8
_LOGITS_PEERS = ("liger.LigerKLDIVLoss", "ejkernel-xla")
_OPTIONAL_LOGITS_PEERS = ("ejkernel-tilelang",)
_LINEAR_PEER = "liger.LigerFusedLinearJSD"


def targets(rows: list[dict]) -> list[dict]:
    """Each GPU target judged from one run's rows: ``met`` is True or False, or None where a row
    it needs was not measured (a missing peer, a failed path), and ``note`` says which.

    * ``kl_from_logits`` (``kldiv-pallas`` and ``kldiv-auto``): forward at ≥ 80% of the measured
      copy bandwidth (``fwd_bw_fraction``: both inputs read once), and forward+backward faster
      than ``LigerKLDIVLoss`` + ``log_softmax`` and than ejkernel (its XLA path; its TileLang
      path too where it ran).
    * ``fused_linear_kl``: forward+backward faster than ``LigerFusedLinearJSD`` with no more peak
      memory (kldiv's ``peak_MiB`` from the compiled program's memory analysis, Liger's from
      ``torch.cuda.max_memory_allocated``; both count inputs, results and temporaries).
    """
    by_case: dict[str, dict[str, dict]] = {}
    for r in rows:
        by_case.setdefault(str(r.get("case")), {})[str(r.get("impl"))] = r
    out = []

    def judge(case, impl, target, measured, met, missing):
        out.append(
            {
                "case": f"target: {case}",
                "impl": impl,
                "target": target,
                "measured": None if missing else measured,
                "met": None if missing else bool(met),
                "note": f"not measured: {', '.join(missing)}" if missing else None,
            }
        )

    for case, impls in by_case.items():
        if case.startswith("kl_from_logits"):
            peers = list(_LOGITS_PEERS)
            peers += [p for p in _OPTIONAL_LOGITS_PEERS if impls.get(p, {}).get("fwdbwd_ms")]
            for impl in ("kldiv-pallas", "kldiv-auto"):
                r = impls.get(impl, {})
                frac = r.get("fwd_bw_fraction")
                target = f"forward ≥ {FWD_BANDWIDTH_TARGET:.0%} of copy bandwidth"
                missing = [] if frac is not None else [impl]
                measured = f"{frac:.0%}" if frac is not None else None
                judge(case, impl, target, measured, frac and frac >= FWD_BANDWIDTH_TARGET, missing)
                ms = r.get("fwdbwd_ms")
                times = {p: impls.get(p, {}).get("fwdbwd_ms") for p in peers}
                missing = [p for p, t in times.items() if t is None] + ([] if ms else [impl])
                best = min((t for t in times.values() if t is not None), default=0.0)
                target = "forward+backward faster than " + " and ".join(peers)
                judge(case, impl, target, f"{ms} ms vs {best:.2f} ms", ms and ms < best, missing)
        elif case.startswith("fused_linear_kl"):
            ours, theirs = impls.get("kldiv", {}), impls.get(_LINEAR_PEER, {})
            for key, unit, target in (
                ("fwdbwd_ms", "ms", f"forward+backward faster than {_LINEAR_PEER}"),
                ("peak_MiB", "MiB", f"peak memory ≤ {_LINEAR_PEER}'s"),
            ):
                x, y = ours.get(key), theirs.get(key)
                missing = [name for name, val in (("kldiv", x), (_LINEAR_PEER, y)) if val is None]
                met = x is not None and y is not None and (x < y if unit == "ms" else x <= y)
                judge(case, "kldiv", target, f"{x} {unit} vs {y} {unit}", met, missing)
    return out


def _test_suites(progress, timeout_s: float) -> dict:
    """The discrete and fused suites on this backend, in a subprocess stopped after
    ``timeout_s`` (its row then says so, and the benchmarks still run)."""
    progress(f"test suites on this backend (pytest subprocess, at most {timeout_s:.0f} s)")
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
           "tests/test_discrete.py", "tests/test_fused.py", "tests/test_properties.py"]  # fmt: skip
    t0 = time.perf_counter()
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as e:
        text = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        progress_lines = [
            ln for ln in text.splitlines() if ln and set(ln.split(" [")[0]) <= set(".sxXF")
        ]
        done = sum(ln.split(" [")[0].count(".") for ln in progress_lines)
        return {"case": "test suites", "impl": "pytest", "rc": 124,
                "seconds": time.perf_counter() - t0,
                "note": f"timed out after {timeout_s:.0f} s ({done} tests had passed)"}  # fmt: skip
    tail = (out.stdout + out.stderr).strip().splitlines()[-1:] or [""]
    return {"case": "test suites", "impl": "pytest", "rc": out.returncode,
            "seconds": time.perf_counter() - t0, "note": tail[0][:160]}  # fmt: skip


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__)
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes, any backend")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="bench/results")
    parser.add_argument(
        "--test-timeout", type=float, default=240, help="seconds for the test subprocess"
    )
    parser.add_argument("--no-tests", action="store_true", help="benchmarks only")
    args = parser.parse_args(argv)
    progress = _Progress()
    on_gpu = jax.default_backend() == "gpu"
    if not on_gpu and not args.dry_run:
        print("bench.gpu: no GPU backend; use --dry-run to exercise the script", file=sys.stderr)
        return 2
    shapes, linear = (DRY_SHAPES, DRY_LINEAR) if args.dry_run else (FULL_SHAPES, FULL_LINEAR)
    path = os.path.join(args.out, "gpu_dry_run.json" if args.dry_run else "gpu.json")
    rows: list[dict] = []

    def save(new_rows):
        # written after every section, so that a run stopped by a time limit keeps its rows
        rows.extend(new_rows)
        common.write_json(path, "gpu", rows, vars(args))

    if not (args.dry_run or args.no_tests):
        save([_test_suites(progress, args.test_timeout)])
    bw = _bandwidth(2 * shapes[0][0] * shapes[0][1] * 2, args.repeats)
    save([{"case": "copy bandwidth", "impl": "jnp copy", "GB/s": bw / 1e9}])
    for shape in shapes:
        save(_logits_rows(shape, bw, args, progress))
    save(_linear_rows(linear, args, progress))
    judged = targets(rows)
    save(judged)
    print(common.format_table([r for r in rows if r not in judged]))
    print(common.format_table(judged))
    failed = [
        r for r in rows if str(r.get("note", "")).startswith("failed") and "kldiv" in r["impl"]
    ]
    return 1 if failed or any(r.get("rc") for r in rows) else 0


class _Progress:
    def __init__(self):
        self.t0 = time.perf_counter()

    def __call__(self, message: str) -> None:
        print(
            f"[{time.perf_counter() - self.t0:7.1f}s] gpu: {message}", file=sys.stderr, flush=True
        )


if __name__ == "__main__":
    sys.exit(main())
