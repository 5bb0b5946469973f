"""Knowledge distillation on scikit-learn's 8×8 digits: forward KL vs reverse KL vs JSD students.

    python examples/distill_digits.py             # full run (about a minute on 2 CPU cores)
    python examples/distill_digits.py --quick     # reduced run (tests)

A teacher MLP (64 → 128 → 128 → 10) is trained on the hard labels. Small students
(64 → 8 → 10, one shared initialisation per seed) are then trained on the teacher's logits with
:func:`kldiv.losses.distillation_loss` and no label information, one per objective:

* ``forward``: KL(p_T ‖ q_S), the classic mode-covering distillation loss (Hinton et al. 2015);
* ``reverse``: KL(q_S ‖ p_T), mode-seeking (Gu et al. 2024);
* ``jsd``: the Jensen–Shannon divergence (β = 0.5; Agarwal et al. 2024);

plus a ``hard labels`` student trained with cross-entropy on the labels only (the baseline). All
distillation losses use temperature T (default 4) on both teacher and student, with Hinton's T²
factor, and ``reduction="mean"`` over the batch (each example weighs the same; the choice has no
effect on the optimum here since every batch has the same size). Students are compared by test
accuracy, averaged over ``--seeds`` seeds (student initialisation and batch order).

Outputs (``--out``, default ``examples/figures``): ``distill_digits_loss.png`` (training losses
and test accuracy against steps) and ``distill_digits_accuracy.png`` (final test accuracy per
objective, with the teacher's).
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
from _common import DEFAULT_OUT, MLP, load_digits_split
from flax import nnx
from tqdm import tqdm

import kldiv.nnx
from kldiv.losses import distillation_loss

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

OBJECTIVES = ("hard labels", "forward", "reverse", "jsd")


@nnx.jit
def accuracy(model: MLP, x: jax.Array, y: jax.Array) -> jax.Array:
    return jnp.mean(jnp.argmax(model(x), axis=-1) == y)


def train(model, loss_fn, data, *, steps, batch_size, lr, seed, eval_every, x_test, y_test, desc):
    """Adam on minibatches of ``data`` (arrays indexed together); returns the loss/acc history."""
    optimizer = nnx.Optimizer(model, optax.adam(lr), wrt=nnx.Param)
    train_step = kldiv.nnx.make_train_step(loss_fn)
    rng = np.random.default_rng(seed)
    n = data[0].shape[0]
    perm, pos = rng.permutation(n), 0
    hist = {"loss": [], "eval_step": [], "test_acc": []}
    bar = tqdm(range(steps), desc=desc, mininterval=0.5, leave=False)
    for step in bar:
        if pos + batch_size > n:
            perm, pos = rng.permutation(n), 0
        idx = perm[pos : pos + batch_size]
        pos += batch_size
        loss = train_step(model, optimizer, *(d[idx] for d in data))
        hist["loss"].append(float(loss))
        if step % eval_every == 0 or step == steps - 1:
            hist["eval_step"].append(step)
            hist["test_acc"].append(float(accuracy(model, x_test, y_test)))
            bar.set_postfix(loss=f"{float(loss):.4f}", test_acc=f"{hist['test_acc'][-1]:.3f}")
    bar.close()
    return hist


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=None, help="student steps (default 2000)")
    parser.add_argument("--quick", action="store_true", help="few steps, small models (tests)")
    parser.add_argument("--out", default=DEFAULT_OUT, help="figure directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seeds", type=int, default=None, help="student seeds (default 3)")
    parser.add_argument("--temperature", type=float, default=4.0)
    parser.add_argument("--student-hidden", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args(argv)
    steps = args.steps or (150 if args.quick else 2000)
    teacher_steps = 200 if args.quick else 1500
    n_seeds = args.seeds or (1 if args.quick else 3)
    teacher_sizes = (64, 32, 10) if args.quick else (64, 128, 128, 10)
    student_sizes = (64, args.student_hidden, 10)
    temperature = args.temperature
    os.makedirs(args.out, exist_ok=True)
    t0 = time.perf_counter()

    x_train, x_test, y_train, y_test = load_digits_split(args.seed)
    x_test_j, y_test_j = jnp.asarray(x_test), jnp.asarray(y_test)
    common = dict(batch_size=args.batch_size, x_test=x_test_j, y_test=y_test_j)
    eval_every = max(steps // 25, 1)

    def hard_label_loss(model, x, y):
        return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

    teacher = MLP(teacher_sizes, rngs=nnx.Rngs(args.seed))
    train(
        teacher,
        hard_label_loss,
        (x_train, y_train),
        steps=teacher_steps,
        lr=1e-3,
        seed=args.seed,
        eval_every=max(teacher_steps // 10, 1),
        desc="teacher",
        **common,
    )
    teacher_acc = float(accuracy(teacher, x_test_j, y_test_j))
    teacher_logits = np.asarray(teacher(jnp.asarray(x_train)))
    print(f"teacher test accuracy {teacher_acc:.4f}")

    def distill_loss(direction):
        def loss_fn(model, x, t_logits):
            return distillation_loss(
                t_logits,
                model(x),
                reduction="mean",
                temperature=temperature,
                scale_by_temperature_squared=True,
                direction=direction,
            )

        return loss_fn

    results = {name: [] for name in OBJECTIVES}
    histories = {name: [] for name in OBJECTIVES}
    runs = [(s, name) for s in range(n_seeds) for name in OBJECTIVES]
    for s, name in tqdm(runs, desc="students"):
        student = MLP(student_sizes, rngs=nnx.Rngs(1000 + args.seed + s))  # same init per seed
        if name == "hard labels":
            loss_fn, data = hard_label_loss, (x_train, y_train)
        else:
            loss_fn, data = distill_loss(name), (x_train, teacher_logits)
        hist = train(
            student,
            loss_fn,
            data,
            steps=steps,
            lr=3e-3,
            seed=args.seed + s,
            eval_every=eval_every,
            desc=f"{name} (seed {s})",
            **common,
        )
        histories[name].append(hist)
        results[name].append(float(accuracy(student, x_test_j, y_test_j)))

    metrics = {
        "teacher_acc": teacher_acc,
        "seeds": n_seeds,
        "steps": steps,
        **{f"acc_{name.replace(' ', '_')}": float(np.mean(v)) for name, v in results.items()},
        **{f"acc_std_{name.replace(' ', '_')}": float(np.std(v)) for name, v in results.items()},
        "seconds": time.perf_counter() - t0,
    }

    # --- figures -------------------------------------------------------------------------------
    colors = dict(zip(OBJECTIVES, ("tab:gray", "tab:blue", "tab:orange", "tab:green"), strict=True))
    fig, ax = plt.subplots(1, 2, figsize=(11, 3.8))
    for name in OBJECTIVES:
        h = histories[name][0]
        ax[0].plot(h["loss"], lw=0.7, color=colors[name], label=name)
        acc = np.mean([hh["test_acc"] for hh in histories[name]], axis=0)
        ax[1].plot(h["eval_step"], acc, "o-", ms=2.5, color=colors[name], label=name)
    ax[0].set(
        yscale="log",
        xlabel="step",
        ylabel="training loss (each its own)",
        title=f"student losses (seed 0; T = {temperature:g}, × T²)",
    )
    ax[0].legend()
    ax[1].axhline(teacher_acc, color="k", ls="--", lw=0.8, label="teacher")
    ax[1].set(xlabel="step", ylabel="test accuracy", title=f"mean over {n_seeds} seed(s)")
    ax[1].set_ylim(max(0.0, min(min(v) for v in results.values()) - 0.15), 1.0)
    ax[1].legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "distill_digits_loss.png"), dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    means = [np.mean(results[n]) for n in OBJECTIVES]
    stds = [np.std(results[n]) for n in OBJECTIVES]
    bars = ax.bar(OBJECTIVES, means, yerr=stds, capsize=4, color=[colors[n] for n in OBJECTIVES])
    for b, m in zip(bars, means, strict=True):
        ax.text(b.get_x() + b.get_width() / 2, m + 0.004, f"{m:.3f}", ha="center", va="bottom")
    ax.axhline(teacher_acc, color="k", ls="--", lw=0.8, label=f"teacher {teacher_acc:.3f}")
    ax.set_ylim(max(0.0, min(means) - 0.1), 1.0)
    ax.set(
        ylabel="test accuracy",
        title=f"student 64→{args.student_hidden}→10, {steps} steps, {n_seeds} seed(s)",
    )
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "distill_digits_accuracy.png"), dpi=110)
    plt.close(fig)

    summary = ", ".join(f"{n} {np.mean(results[n]):.4f}" for n in OBJECTIVES)
    print(
        f"distill_digits: teacher {teacher_acc:.4f}; students {summary}; "
        f"{metrics['seconds']:.1f} s; figures in {args.out}"
    )
    return metrics


if __name__ == "__main__":
    main()
