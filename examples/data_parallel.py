"""Data-parallel training with a global masked mean: ``kldiv.reduce(..., axis_name=)`` in shard_map.

    XLA_FLAGS=--xla_force_host_platform_device_count=4 python examples/data_parallel.py
    XLA_FLAGS=--xla_force_host_platform_device_count=4 python examples/data_parallel.py --quick

An MLP (64 → 32 → 10) on scikit-learn's digits is fitted to label-smoothed targets with the
per-example loss KL(targets ‖ softmax(logits)) (``kldiv.kl_from_logits``). The data is split over
a 1-D mesh of all devices (``jax.sharding.NamedSharding``, axis ``"data"``); the parameters are
replicated. Each epoch ends with a partial batch padded to the global batch size, and the padding
is masked out, so devices hold different numbers of real examples.

The train step is a ``jax.shard_map`` (default ``check_vma=True``) around
``jax.value_and_grad``: each device computes its per-example values and calls
``kldiv.reduce(values, "mean", mask=mask, axis_name="data")``, which ``psum``s the masked sum and
the kept count across devices *before* dividing. The loss is therefore the global masked mean
(Σ over all kept examples / number of kept examples), not the average of per-device means, which
is wrong whenever the devices keep different counts. With ``check_vma=True`` shard_map knows the
replicated parameters are device-invariant and the transpose of their implicit broadcast is a
``psum``, so the gradients that come out are the global gradients, already summed. The example
checks, on every step, that the loss and the gradients equal those of the same batch computed
without sharding on one device, and that plain ``jax.jit`` on the sharded arrays (GSPMD) gives the
same loss; it prints the (wrong) average of per-device means for the first padded batch.

Outputs (``--out``, default ``examples/figures``): ``data_parallel_loss.png`` (global loss per
step and its difference from the single-device loss).
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax
from _common import DEFAULT_OUT, init_mlp, load_digits_split, mlp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

import kldiv

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

AXIS = "data"


def loss_fn(params, x, target_logits, mask, axis_name=None):
    """Global masked mean of KL(target ‖ model) per example (over ``axis_name`` when given)."""
    values = kldiv.kl_from_logits(target_logits, mlp(params, x))
    return kldiv.reduce(values, "mean", mask=mask, axis_name=axis_name)


def batches(n: int, global_batch: int, rng: np.random.Generator):
    """Endless epochs of index arrays of length ``global_batch`` plus a keep-mask (padding)."""
    while True:
        perm = rng.permutation(n)
        for start in range(0, n, global_batch):
            idx = perm[start : start + global_batch]
            keep = np.ones(global_batch, bool)
            keep[len(idx) :] = False
            yield np.concatenate([idx, np.zeros(global_batch - len(idx), idx.dtype)]), keep


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=None, help="train steps (default 600)")
    parser.add_argument("--quick", action="store_true", help="few steps, small model (tests)")
    parser.add_argument("--out", default=DEFAULT_OUT, help="figure directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--per-device-batch", type=int, default=32)
    args = parser.parse_args(argv)
    steps = args.steps or (40 if args.quick else 600)
    sizes = (64, 16, 10) if args.quick else (64, 32, 10)
    os.makedirs(args.out, exist_ok=True)
    t0 = time.perf_counter()

    devices = jax.devices()
    n_dev = len(devices)
    if n_dev == 1:
        print(
            "data_parallel: one device; on CPU run with "
            "XLA_FLAGS=--xla_force_host_platform_device_count=4 to see a real split"
        )
    mesh = Mesh(np.array(devices), (AXIS,))
    data_sharding = NamedSharding(mesh, P(AXIS))
    replicated = NamedSharding(mesh, P())
    global_batch = args.per_device_batch * n_dev

    x_train, x_test, y_train, y_test = load_digits_split(args.seed)
    smooth = 0.1
    targets = np.log((1 - smooth) * np.eye(10)[y_train] + smooth / 10).astype(np.float32)

    tx = optax.adam(3e-3)
    params = jax.device_put(init_mlp(jax.random.key(args.seed), sizes), replicated)
    opt_state = jax.device_put(tx.init(params), replicated)

    def local_value_and_grad(params, x, t, m):
        return jax.value_and_grad(loss_fn)(params, x, t, m, axis_name=AXIS)

    sharded_value_and_grad = jax.shard_map(
        local_value_and_grad,
        mesh=mesh,
        in_specs=(P(), P(AXIS), P(AXIS), P(AXIS)),
        out_specs=(P(), P()),  # loss and gradients are device-invariant (already psum'd)
    )

    @jax.jit
    def train_step(params, opt_state, x, t, m):
        loss, grads = sharded_value_and_grad(params, x, t, m)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, grads

    single_value_and_grad = jax.jit(jax.value_and_grad(loss_fn))  # reference: no sharding
    gspmd_loss = jax.jit(loss_fn)  # plain jit on sharded arrays: XLA inserts the collectives

    @jax.jit
    def per_device_means(x, t, m, params):  # the wrong aggregate, for comparison
        values = kldiv.kl_from_logits(t, mlp(params, x)).reshape(n_dev, -1)
        m = m.reshape(n_dev, -1)
        return jnp.mean(jnp.sum(values * m, 1) / jnp.maximum(jnp.sum(m, 1), 1))

    dev0 = devices[0]
    rng = np.random.default_rng(args.seed)
    stream = batches(len(x_train), global_batch, rng)
    history = {"loss": [], "rel": [], "naive_step": [], "naive_rel": []}
    max_rel_loss = max_rel_grad = max_rel_gspmd = 0.0
    shown = False
    for _ in (bar := tqdm(range(steps), desc=f"data-parallel ({n_dev} devices)", mininterval=0.5)):
        idx, keep = next(stream)
        batch = (x_train[idx], targets[idx], keep)
        sharded = jax.device_put(batch, data_sharding)
        ref_loss, ref_grads = single_value_and_grad(
            jax.device_put(params, dev0), *jax.device_put(batch, dev0)
        )
        g_loss = gspmd_loss(params, *sharded)
        if not keep.all():
            naive = float(per_device_means(*batch, jax.device_put(params, dev0)))
            history["naive_step"].append(len(history["loss"]))
            history["naive_rel"].append(abs(naive - float(ref_loss)) / float(ref_loss))
            if not shown:
                kept = keep.reshape(n_dev, -1).sum(1)
                print(
                    f"\npadded batch: kept examples per device {kept.tolist()}; global masked "
                    f"mean {float(ref_loss):.6f}, average of per-device means {naive:.6f}"
                )
                shown = True
        params, opt_state, loss, grads = train_step(params, opt_state, *sharded)

        rel = abs(float(loss) - float(ref_loss)) / abs(float(ref_loss))
        gdiff = [
            np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(np.asarray(b)))
            for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True)
        ]
        max_rel_loss = max(max_rel_loss, rel)
        max_rel_grad = max(max_rel_grad, float(max(gdiff)))
        max_rel_gspmd = max(max_rel_gspmd, abs(float(g_loss) - float(ref_loss)) / float(ref_loss))
        history["loss"].append(float(loss))
        history["rel"].append(rel)
        bar.set_postfix(loss=f"{float(loss):.4f}", rel_diff=f"{rel:.1e}")
    bar.close()

    # float32 sums in a different order: equal to rounding
    assert max_rel_loss < 1e-5, f"sharded loss differs from single-device loss: {max_rel_loss}"
    assert max_rel_gspmd < 1e-5, f"GSPMD loss differs from single-device loss: {max_rel_gspmd}"
    assert max_rel_grad < 1e-4, f"sharded gradients differ from single-device: {max_rel_grad}"

    test_acc = float(jnp.mean(jnp.argmax(mlp(params, jnp.asarray(x_test)), -1) == y_test))
    metrics = {
        "devices": n_dev,
        "steps": steps,
        "global_batch": global_batch,
        "final_loss": float(np.mean(history["loss"][-10:])),
        "first_loss": float(history["loss"][0]),
        "max_rel_loss_diff": max_rel_loss,
        "max_rel_grad_diff": max_rel_grad,
        "max_rel_gspmd_diff": max_rel_gspmd,
        "test_acc": test_acc,
        "seconds": time.perf_counter() - t0,
    }

    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    steps_axis = np.arange(steps)
    ax[0].plot(steps_axis, history["loss"], lw=0.8)
    padded = history["naive_step"]
    ax[0].plot(padded, np.asarray(history["loss"])[padded], "o", ms=3, label="padded batch")
    ax[0].set(
        yscale="log",
        xlabel="step",
        ylabel="global masked mean KL",
        title=f"shard_map over {n_dev} device(s), global batch {global_batch}",
    )
    ax[0].legend()
    floor = 1e-10  # exact agreement (0) is drawn at the floor
    ax[1].semilogy(
        steps_axis,
        np.maximum(history["rel"], floor),
        ".",
        ms=3,
        label="kldiv.reduce(..., axis_name=) in shard_map",
    )
    ax[1].semilogy(
        padded,
        np.maximum(history["naive_rel"], floor),
        "x",
        ms=4,
        color="tab:red",
        label="average of per-device means (padded batches)",
    )
    ax[1].set(
        xlabel="step",
        ylabel="relative difference (0 drawn at 1e-10)",
        title="vs the single-device loss on the same batch",
    )
    ax[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "data_parallel_loss.png"), dpi=110)
    plt.close(fig)

    print(
        f"data_parallel: {n_dev} devices, {steps} steps in {metrics['seconds']:.1f} s; loss "
        f"{metrics['first_loss']:.4f} → {metrics['final_loss']:.4f}; max relative difference "
        f"from single-device: loss {max_rel_loss:.1e}, gradients {max_rel_grad:.1e}, "
        f"GSPMD loss {max_rel_gspmd:.1e}; test accuracy {test_acc:.4f}"
    )
    return metrics


if __name__ == "__main__":
    main()
