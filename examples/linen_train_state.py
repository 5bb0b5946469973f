"""The same kldiv losses in a Flax Linen ``flax.training.train_state.TrainState`` step.

    python examples/linen_train_state.py          # full run (seconds)
    python examples/linen_train_state.py --quick  # reduced run (tests)

Two Linen models on scikit-learn's digits, each trained by the same five-line TrainState step:

* a VAE whose loss is ``kldiv.reduce(kl_standard_normal(mean, log_var) − log p(x|z), "dataset",
  dataset_size=N)``: the negative ELBO with the KL from kldiv, reconstruction and KL reduced
  together (so β stays 1) and scaled to the whole training set (N/B × minibatch sum, Kingma &
  Welling 2014, eq. 8); the noise comes from Linen's ``"sample"`` rng collection;
* a small student classifier distilled from a teacher's logits with
  ``kldiv.losses.distillation_loss(..., direction="forward", reduction="mean")``.

Nothing in kldiv depends on NNX or Linen: the losses are plain functions of arrays.

Output (``--out``, default ``examples/figures``): ``linen_train_state_loss.png``.
"""

from __future__ import annotations

import argparse
import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax
from _common import DEFAULT_OUT, load_digits_split
from flax.training import train_state
from tqdm import tqdm

import kldiv
from kldiv.gaussian import kl_standard_normal
from kldiv.losses import distillation_loss

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


class VAE(nn.Module):
    hidden: int
    latent: int

    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Dense(self.hidden)(x))
        mean, log_var = nn.Dense(self.latent)(h), nn.Dense(self.latent)(h)
        eps = jax.random.normal(self.make_rng("sample"), mean.shape, mean.dtype)
        z = mean + jnp.exp(0.5 * log_var) * eps  # reparameterised sample
        logits = nn.Dense(64)(nn.relu(nn.Dense(self.hidden)(z)))
        return logits, mean, log_var


class MLP(nn.Module):
    hidden: int

    @nn.compact
    def __call__(self, x):
        return nn.Dense(10)(nn.relu(nn.Dense(self.hidden)(x)))


def make_step(loss_fn):
    """``loss_fn(params, apply_fn, *batch) -> loss``; returns a jitted TrainState step."""

    @jax.jit
    def step(state: train_state.TrainState, *batch):
        loss, grads = jax.value_and_grad(loss_fn)(state.params, state.apply_fn, *batch)
        return state.apply_gradients(grads=grads), loss

    return step


def fit(state, step, arrays, *, steps, batch_size, seed, desc, with_key=False):
    rng = np.random.default_rng(seed)
    key = jax.random.key(seed)
    losses = []
    for _ in tqdm(range(steps), desc=desc, mininterval=0.5):
        idx = rng.integers(0, arrays[0].shape[0], batch_size)
        extra = (jax.random.fold_in(key, len(losses)),) if with_key else ()
        state, loss = step(state, *(a[idx] for a in arrays), *extra)
        losses.append(float(loss))
    return state, losses


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=None, help="steps per model (default 2000)")
    parser.add_argument("--quick", action="store_true", help="few steps, small models (tests)")
    parser.add_argument("--out", default=DEFAULT_OUT, help="figure directory")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    steps = args.steps or (100 if args.quick else 2000)
    hidden = 16 if args.quick else 32
    os.makedirs(args.out, exist_ok=True)
    t0 = time.perf_counter()

    x_train, x_test, y_train, y_test = load_digits_split(args.seed)
    n = x_train.shape[0]
    keys = jax.random.split(jax.random.key(args.seed), 3)

    # --- VAE: negative ELBO with the KL from kldiv, one "dataset" reduction for both terms -------
    def vae_loss(params, apply_fn, x, key):
        logits, mean, log_var = apply_fn({"params": params}, x, rngs={"sample": key})
        log_lik = -optax.sigmoid_binary_cross_entropy(logits, x).sum(-1)
        return kldiv.reduce(kl_standard_normal(mean, log_var) - log_lik, "dataset", dataset_size=n)

    vae = VAE(hidden, 8 if not args.quick else 4)
    params = vae.init({"params": keys[0], "sample": keys[0]}, x_train[:1])["params"]
    state = train_state.TrainState.create(apply_fn=vae.apply, params=params, tx=optax.adam(3e-3))
    state, vae_losses = fit(
        state,
        make_step(vae_loss),
        (x_train,),
        steps=steps,
        batch_size=128,
        seed=args.seed,
        desc="linen vae",
        with_key=True,
    )
    vae_losses = np.asarray(vae_losses) / n  # per image

    # --- distillation: teacher on hard labels, student on the teacher's logits -----------------
    def ce_loss(params, apply_fn, x, y):
        return optax.softmax_cross_entropy_with_integer_labels(
            apply_fn({"params": params}, x), y
        ).mean()

    def distill_loss(params, apply_fn, x, teacher_logits):
        student_logits = apply_fn({"params": params}, x)
        return distillation_loss(
            teacher_logits,
            student_logits,
            reduction="mean",
            temperature=4.0,
            scale_by_temperature_squared=True,
            direction="forward",
        )

    def accuracy(state, x, y):
        return float(jnp.mean(jnp.argmax(state.apply_fn({"params": state.params}, x), -1) == y))

    teacher, student = MLP(4 * hidden), MLP(8)
    t_state = train_state.TrainState.create(
        apply_fn=teacher.apply,
        params=teacher.init(keys[1], x_train[:1])["params"],
        tx=optax.adam(1e-3),
    )
    t_state, _ = fit(
        t_state,
        make_step(ce_loss),
        (x_train, y_train),
        steps=steps,
        batch_size=128,
        seed=args.seed,
        desc="linen teacher",
    )
    teacher_logits = np.asarray(t_state.apply_fn({"params": t_state.params}, x_train))
    s_state = train_state.TrainState.create(
        apply_fn=student.apply,
        params=student.init(keys[2], x_train[:1])["params"],
        tx=optax.adam(3e-3),
    )
    s_state, distill_losses = fit(
        s_state,
        make_step(distill_loss),
        (x_train, teacher_logits),
        steps=steps,
        batch_size=128,
        seed=args.seed,
        desc="linen student",
    )

    k = max(steps // 20, 1)
    metrics = {
        "steps": steps,
        "vae_nelbo_first": float(np.mean(vae_losses[:k])),
        "vae_nelbo_last": float(np.mean(vae_losses[-k:])),
        "distill_loss_first": float(np.mean(distill_losses[:k])),
        "distill_loss_last": float(np.mean(distill_losses[-k:])),
        "teacher_acc": accuracy(t_state, x_test, y_test),
        "student_acc": accuracy(s_state, x_test, y_test),
        "seconds": time.perf_counter() - t0,
    }

    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    ax[0].plot(vae_losses, lw=0.6)
    ax[0].set(xlabel="step", ylabel="−ELBO per image (nats)", title="Linen VAE (TrainState)")
    ax[0].set_ylim(top=float(np.percentile(vae_losses, 99)))
    ax[1].plot(distill_losses, lw=0.6)
    ax[1].set(
        yscale="log",
        xlabel="step",
        ylabel="forward KL × T² (T = 4)",
        title=f"Linen student: test accuracy {metrics['student_acc']:.3f}",
    )
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "linen_train_state_loss.png"), dpi=110)
    plt.close(fig)

    print(
        f"linen_train_state: VAE −ELBO per image {metrics['vae_nelbo_first']:.2f} → "
        f"{metrics['vae_nelbo_last']:.2f}; teacher {metrics['teacher_acc']:.4f}, distilled "
        f"student {metrics['student_acc']:.4f}; {metrics['seconds']:.1f} s"
    )
    return metrics


if __name__ == "__main__":
    main()
