"""A variational autoencoder on scikit-learn's 8×8 digits with Flax NNX, Optax and kldiv.

    python examples/vae_digits.py                 # full run (a few seconds to a minute on CPU)
    python examples/vae_digits.py --quick         # reduced run (tests)

Model: encoder 64 → 32 (ReLU) → :class:`kldiv.nnx.GaussianHead` (latent 8), decoder
8 → 32 (ReLU) → 64 Bernoulli logits. Pixel intensities (0..16) are scaled to [0, 1] and scored
with the Bernoulli log-likelihood Σ_pixels [x log σ(l) + (1 − x) log(1 − σ(l))], the usual choice
for grey levels in [0, 1] (it is not a normalised density for non-binary x, so the bound is a
relative score, not comparable with binarised-data numbers).

The KL term is kldiv's :func:`kldiv.gaussian.kl_standard_normal` (summed over the 8 latents,
never averaged), combined with the reconstruction term per example and reduced once by
:func:`kldiv.nnx.negative_elbo` with ``reduction="dataset"``, ``dataset_size=N``: N/B × the
minibatch sum, the unbiased minibatch estimate of the whole-training-set negative ELBO
(Kingma & Welling 2014, eq. 8). Why this choice: both terms go through the same reduction, so the
KL keeps its weight β = 1 relative to the reconstruction (averaging the reconstruction over pixels
or over the batch while summing the KL, a common slip, changes β silently), and the loss value is
the bound on the training set's log-likelihood that the ELBO is meant to be. With Adam, "mean"
(the same objective divided by N) trains almost identically; the printed numbers are per image
(loss / N) so they read in nats per image either way.

Outputs (``--out``, default ``examples/figures``): ``vae_digits_loss.png`` (−ELBO and KL per
image against steps), ``vae_digits_reconstructions.png`` (test digits and their
reconstructions), ``vae_digits_samples.png`` (decoded draws from the prior).
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
from _common import DEFAULT_OUT, load_digits_split
from flax import nnx
from tqdm import tqdm

import kldiv
import kldiv.nnx
from kldiv.gaussian import kl_standard_normal

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


class VAE(nnx.Module):
    """64 → hidden → (μ, log σ²) ∈ R^latent → hidden → 64 Bernoulli logits."""

    def __init__(self, hidden: int, latent: int, *, rngs: nnx.Rngs):
        self.enc = nnx.Linear(64, hidden, rngs=rngs)
        self.head = kldiv.nnx.GaussianHead(hidden, latent, rngs=rngs)
        self.dec1 = nnx.Linear(latent, hidden, rngs=rngs)
        self.dec2 = nnx.Linear(hidden, 64, rngs=rngs)

    def decode(self, z: jax.Array) -> jax.Array:
        return self.dec2(jax.nn.relu(self.dec1(z)))

    def __call__(self, x: jax.Array, *, deterministic: bool = False):
        z, mean, log_var = self.head(jax.nn.relu(self.enc(x)), deterministic=deterministic)
        return self.decode(z), mean, log_var


def bernoulli_log_likelihood(logits: jax.Array, x: jax.Array) -> jax.Array:
    """log p(x|z) per example, summed over the 64 pixels."""
    return -jnp.sum(optax.sigmoid_binary_cross_entropy(logits, x), axis=-1)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=None, help="train steps (default 4000)")
    parser.add_argument("--quick", action="store_true", help="few steps, small model (tests)")
    parser.add_argument("--out", default=DEFAULT_OUT, help="figure directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    args = parser.parse_args(argv)
    steps = args.steps or (200 if args.quick else 4000)
    hidden, latent = (16, 4) if args.quick else (32, 8)
    os.makedirs(args.out, exist_ok=True)
    t0 = time.perf_counter()

    x_train, x_test, _, y_test = load_digits_split(args.seed)  # intensities → [0, 1]
    n = x_train.shape[0]
    model = VAE(hidden, latent, rngs=nnx.Rngs(params=args.seed, sample=args.seed + 1))
    schedule = optax.cosine_decay_schedule(args.lr, steps, alpha=0.1)
    optimizer = nnx.Optimizer(model, optax.adam(schedule), wrt=nnx.Param)

    def loss_fn(model, x):
        logits, mean, log_var = model(x)
        log_lik = bernoulli_log_likelihood(logits, x)
        # one reduction for both terms; see the module docstring for why "dataset"
        loss = kldiv.nnx.negative_elbo(log_lik, mean, log_var, reduction="dataset", dataset_size=n)
        kl = kldiv.reduce(kl_standard_normal(mean, log_var), "mean")
        return loss, kl

    @nnx.jit  # compiles once: the batch shape is fixed, the rng counter is model state
    def train_step(model, optimizer, x):
        (loss, kl), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model, x)
        optimizer.update(model, grads)  # updates the model's nnx.Param in place
        return loss, kl

    # (kldiv.nnx.make_train_step(loss_fn, has_aux=True) builds the same step)

    @nnx.jit
    def evaluate(model, x):
        """−ELBO and KL per image on x (one reparameterised sample per image)."""
        logits, mean, log_var = model(x)
        nelbo = kldiv.nnx.negative_elbo(
            bernoulli_log_likelihood(logits, x), mean, log_var, reduction="mean"
        )
        return nelbo, kldiv.reduce(kl_standard_normal(mean, log_var), "mean")

    rng = np.random.default_rng(args.seed)
    history = {"step": [], "train_nelbo": [], "train_kl": [], "test_step": [], "test_nelbo": []}
    perm, pos = rng.permutation(n), 0
    bar = tqdm(range(steps), desc="vae", mininterval=0.5)
    for step in bar:
        if pos + args.batch_size > n:
            perm, pos = rng.permutation(n), 0
        idx = perm[pos : pos + args.batch_size]
        pos += args.batch_size
        loss, kl = train_step(model, optimizer, x_train[idx])
        history["step"].append(step)
        history["train_nelbo"].append(float(loss) / n)  # per image
        history["train_kl"].append(float(kl))
        if step % max(steps // 20, 1) == 0 or step == steps - 1:
            test_nelbo, _ = evaluate(model, x_test)
            history["test_step"].append(step)
            history["test_nelbo"].append(float(test_nelbo))
            bar.set_postfix(nelbo=f"{loss / n:.2f}", kl=f"{kl:.2f}", test=f"{test_nelbo:.2f}")
    bar.close()

    test_nelbo, test_kl = evaluate(model, x_test)
    train_nelbo, _ = evaluate(model, x_train)
    k = max(len(history["train_nelbo"]) // 20, 1)
    metrics = {
        "steps": steps,
        "train_nelbo_first": float(np.mean(history["train_nelbo"][:k])),
        "train_nelbo_last": float(np.mean(history["train_nelbo"][-k:])),
        "train_nelbo": float(train_nelbo),
        "test_nelbo": float(test_nelbo),
        "test_kl": float(test_kl),
        "seconds": time.perf_counter() - t0,
    }

    # --- figures -------------------------------------------------------------------------------
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    ax[0].plot(history["step"], history["train_nelbo"], lw=0.6, alpha=0.6, label="train (batch)")
    ax[0].plot(history["test_step"], history["test_nelbo"], "o-", ms=3, label="test")
    ax[0].set(xlabel="step", ylabel="−ELBO per image (nats)", title="negative ELBO")
    ax[0].set_ylim(top=float(np.percentile(history["train_nelbo"], 99)))
    ax[0].legend()
    ax[1].plot(history["step"], history["train_kl"], lw=0.6)
    ax[1].set(xlabel="step", ylabel="KL per image (nats)", title="KL(q(z|x) ‖ N(0, I))")
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "vae_digits_loss.png"), dpi=110)
    plt.close(fig)

    # reconstructions: the decoder's Bernoulli means at z = μ, one test digit per class
    picks = np.array([np.flatnonzero(y_test == c)[0] for c in range(10)])
    logits, _, _ = model(jnp.asarray(x_test[picks]), deterministic=True)
    recon = np.asarray(jax.nn.sigmoid(logits))
    fig, ax = plt.subplots(2, 10, figsize=(10, 2.3))
    for i in range(10):
        ax[0, i].imshow(x_test[picks[i]].reshape(8, 8), cmap="gray_r", vmin=0, vmax=1)
        ax[1, i].imshow(recon[i].reshape(8, 8), cmap="gray_r", vmin=0, vmax=1)
    for a in ax.ravel():
        a.set_xticks([])
        a.set_yticks([])
    ax[0, 0].set_ylabel("input")
    ax[1, 0].set_ylabel("recon.")
    fig.suptitle(f"test digits and reconstructions (z = μ); test −ELBO {test_nelbo:.1f} nats")
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "vae_digits_reconstructions.png"), dpi=110)
    plt.close(fig)

    z = jax.random.normal(jax.random.key(args.seed + 2), (30, latent), jnp.float32)
    samples = np.asarray(jax.nn.sigmoid(model.decode(z)))
    fig, ax = plt.subplots(3, 10, figsize=(10, 3.2))
    for a, s in zip(ax.ravel(), samples, strict=True):
        a.imshow(s.reshape(8, 8), cmap="gray_r", vmin=0, vmax=1)
        a.set_axis_off()
    fig.suptitle("decoded samples from the prior z ~ N(0, I)")
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "vae_digits_samples.png"), dpi=110)
    plt.close(fig)

    print(
        f"vae_digits: {steps} steps in {metrics['seconds']:.1f} s; −ELBO per image "
        f"train {metrics['train_nelbo']:.2f}, test {metrics['test_nelbo']:.2f} "
        f"(KL {metrics['test_kl']:.2f}); figures in {args.out}"
    )
    return metrics


if __name__ == "__main__":
    main()
