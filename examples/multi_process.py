"""Two JAX processes on one machine: a global masked mean and a vocabulary-parallel KL.

    python examples/multi_process.py              # launches 2 processes × 2 CPU devices, checks
    python examples/multi_process.py --worker --process-id 0 --port P --out DIR   # one process

The launcher picks a free loopback port and starts two worker processes, each with two CPU
devices (``XLA_FLAGS=--xla_force_host_platform_device_count=2``), CPU collectives over gloo
(``jax.config.update("jax_cpu_collectives_implementation", "gloo")``) and
``jax.distributed.initialize(coordinator_address="127.0.0.1:<port>", num_processes=2,
process_id=i)``: four devices in all, two per process. Each worker computes

* data parallel: a linear head (``[H, V]`` weight, replicated) fitted to target logits over a
  batch of sequences split over the four devices, with a token mask that keeps a different number
  of tokens on every device. The loss is ``kldiv.reduce(kl_from_logits(target, logits), "mean",
  mask=mask, axis_name="data")`` inside ``jax.shard_map``, which psums the masked sum and the kept
  count across all four devices (both processes) before dividing: the global token mean. Three
  SGD steps are taken; the losses and gradients are returned;
* vocabulary parallel: ``kldiv.kl_from_logits(a, b, axis_name="vocab")`` inside ``jax.shard_map``
  with the vocabulary split over the four devices (each holds V/4 logits of every row), and the
  gradient of its sum with respect to b.

and writes them to ``DIR/worker<i>.npz``. The launcher (and ``tests/test_multiprocess.py``)
compares them with the same computations in one process holding the whole batch and vocabulary.
Every subprocess has a timeout and is killed if anything fails.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np

N_PROCESSES = 2
LOCAL_DEVICES = 2
G, T, H, V = 8, 6, 16, 32  # sequences, tokens, hidden size, vocabulary (V divisible by 4)
LR, STEPS = 0.5, 3


def problem(seed: int = 0):
    """The global batch (identical in every process): hidden, weight, target logits, mask."""
    rng = np.random.default_rng(seed)
    hidden = rng.normal(size=(G, T, H)).astype(np.float32)
    weight = (rng.normal(size=(H, V)) / np.sqrt(H)).astype(np.float32)
    target = (2 * rng.normal(size=(G, T, V))).astype(np.float32)
    mask = np.zeros((G, T), bool)  # two sequences per device, different kept counts
    mask[0:2, :] = True
    mask[2:4, :1] = True
    mask[4:6, :3] = True
    mask[6:8, 5] = True
    a = rng.normal(size=(G * T, V)).astype(np.float32)  # vocabulary-parallel logits
    b = rng.normal(size=(G * T, V)).astype(np.float32)
    return hidden, weight, target, mask, a, b


def loss_fn(weight, hidden, target, mask, axis_name=None):
    import kldiv

    values = kldiv.kl_from_logits(target, hidden @ weight)
    return kldiv.reduce(values, "mean", mask=mask, axis_name=axis_name)


def reference(seed: int = 0) -> dict[str, np.ndarray]:
    """The same computations in one process on one device."""
    import jax
    import jax.numpy as jnp

    import kldiv

    hidden, weight, target, mask, a, b = problem(seed)
    w = jnp.asarray(weight)
    losses, grads = [], []
    for _ in range(STEPS):
        loss, g = jax.value_and_grad(loss_fn)(w, hidden, target, mask)
        losses.append(loss)
        grads.append(g)
        w = w - LR * g
    kl, kl_grad = jax.value_and_grad(lambda b: jnp.sum(kldiv.kl_from_logits(a, b)))(jnp.asarray(b))
    return {
        "losses": np.asarray(jnp.stack(losses)),
        "grads": np.asarray(jnp.stack(grads)),
        "weight": np.asarray(w),
        "vocab_kl_sum": np.asarray(kl),
        "vocab_kl": np.asarray(kldiv.kl_from_logits(a, b)),
        "vocab_grad": np.asarray(kl_grad),
    }


def worker(process_id: int, port: int, out: str, seed: int = 0) -> None:
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    import kldiv

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}",
        num_processes=N_PROCESSES,
        process_id=process_id,
        initialization_timeout=60,
    )
    try:
        assert jax.process_count() == N_PROCESSES, jax.process_count()
        assert jax.local_device_count() == LOCAL_DEVICES, jax.local_devices()
        devices = np.array(jax.devices())  # all four, ordered by process
        hidden, weight, target, mask, a, b = problem(seed)

        def global_array(x, sharding):
            return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

        # data parallel: batch split over "data", weight replicated
        mesh = Mesh(devices, ("data",))
        data, rep = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
        h, t, m = (global_array(x, data) for x in (hidden, target, mask))
        w = global_array(weight, rep)

        value_and_grad = jax.shard_map(
            lambda w, h, t, m: jax.value_and_grad(loss_fn)(w, h, t, m, axis_name="data"),
            mesh=mesh,
            in_specs=(P(), P("data"), P("data"), P("data")),
            out_specs=(P(), P()),  # the global loss and the psum'd gradient, replicated
        )

        @jax.jit
        def train_step(w, h, t, m):
            loss, g = value_and_grad(w, h, t, m)
            return w - LR * g, loss, g

        losses, grads = [], []
        for _ in range(STEPS):
            w, loss, g = train_step(w, h, t, m)
            losses.append(np.asarray(loss.addressable_data(0)))
            grads.append(np.asarray(g.addressable_data(0)))

        # vocabulary parallel: every row's logits split over "vocab"
        vmesh = Mesh(devices, ("vocab",))
        cols = NamedSharding(vmesh, P(None, "vocab"))
        a_g, b_g = global_array(a, cols), global_array(b, cols)

        def vocab_kl(a, b):
            kl = kldiv.kl_from_logits(a, b, axis_name="vocab")  # per row, psum'd over V/4 shards
            return jnp.sum(kl), kl

        vocab_fn = jax.jit(
            jax.shard_map(
                jax.value_and_grad(vocab_kl, argnums=1, has_aux=True),
                mesh=vmesh,
                in_specs=(P(None, "vocab"), P(None, "vocab")),
                out_specs=((P(), P()), P(None, "vocab")),
            )
        )
        (kl_sum, kl), kl_grad = vocab_fn(a_g, b_g)
        # this process holds columns of the gradient; gather the whole of it for the comparison
        full_grad = np.zeros((G * T, V), np.float32)
        for shard in kl_grad.addressable_shards:
            full_grad[shard.index] = np.asarray(shard.data)
        local_cols = np.zeros(V, bool)
        for shard in kl_grad.addressable_shards:
            local_cols[shard.index[1]] = True
        np.savez(
            os.path.join(out, f"worker{process_id}.npz"),
            losses=np.stack(losses),
            grads=np.stack(grads),
            weight=np.asarray(w.addressable_data(0)),
            vocab_kl_sum=np.asarray(kl_sum.addressable_data(0)),
            vocab_kl=np.asarray(kl.addressable_data(0)),
            vocab_grad=full_grad,
            vocab_grad_cols=local_cols,
            devices=np.array([d.id for d in jax.local_devices()]),
        )
    finally:
        jax.distributed.shutdown()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_workers(out: str, timeout: float = 120.0, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Starts the two workers, waits at most ``timeout`` s, kills both if either fails."""
    os.makedirs(out, exist_ok=True)
    port = free_port()
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={LOCAL_DEVICES}"
    env["JAX_PLATFORMS"] = "cpu"
    env.pop("JAX_ENABLE_X64", None)
    # the package this file sits next to comes first (a checkout run without installing)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--port", str(port)]
    logs = [open(os.path.join(out, f"worker{i}.log"), "w+") for i in range(N_PROCESSES)]
    procs = []
    try:
        for i in range(N_PROCESSES):
            args = [*cmd, "--process-id", str(i), "--out", out, "--seed", str(seed)]
            procs.append(subprocess.Popen(args, env=env, stdout=logs[i], stderr=subprocess.STDOUT))
        deadline = time.monotonic() + timeout
        for i, p in enumerate(procs):
            rc = p.wait(timeout=max(1.0, deadline - time.monotonic()))
            if rc != 0:
                logs[i].seek(0)
                raise RuntimeError(f"worker {i} exited with {rc}:\n{logs[i].read()[-4000:]}")
    except BaseException:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        raise
    finally:
        for f in logs:
            f.close()
    results = []
    for i in range(N_PROCESSES):
        with np.load(os.path.join(out, f"worker{i}.npz")) as f:
            results.append(dict(f))
    return results


def compare(results, ref) -> dict[str, float]:
    """Largest relative differences between every worker's results and the reference."""

    def rel(x, y):
        return float(np.max(np.abs(x - y)) / max(float(np.max(np.abs(y))), 1e-30))

    diffs = {}
    for key in ("losses", "grads", "weight", "vocab_kl_sum", "vocab_kl"):
        diffs[key] = max(rel(r[key], ref[key]) for r in results)
    diffs["vocab_grad"] = max(
        rel(r["vocab_grad"][:, r["vocab_grad_cols"]], ref["vocab_grad"][:, r["vocab_grad_cols"]])
        for r in results
    )
    return diffs


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", action="store_true", help="run as one of the processes")
    parser.add_argument("--process-id", type=int, default=0)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--out", default=None, help="directory for the workers' results")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=120.0)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.process_id, args.port, args.out, args.seed)
        return {}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        results = run_workers(args.out or tmp, args.timeout, args.seed)
    ref = reference(args.seed)
    diffs = compare(results, ref)
    print(f"{N_PROCESSES} processes × {LOCAL_DEVICES} CPU devices, gloo collectives:")
    print(f"  data-parallel losses {np.round(results[0]['losses'], 6).tolist()}")
    print(f"  one process          {np.round(ref['losses'], 6).tolist()}")
    for key, d in diffs.items():
        print(f"  max relative difference {key:<14}{d:.1e}")
    print(f"multi_process: {time.perf_counter() - t0:.1f} s")
    assert max(diffs.values()) < 1e-5, diffs
    return diffs


if __name__ == "__main__":
    main()
