"""Code shared by the examples: the digits data, the MLPs and the figure directory.

The examples run as scripts (``python examples/name.py``), which puts this directory on the
import path, so they import it as ``from _common import ...``.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "figures")


def load_digits_split(seed: int, test_size: float = 0.2):
    """scikit-learn's 8×8 digits, intensities 0..16 scaled to [0, 1], split stratified by class.

    Returns ``(x_train, x_test, y_train, y_test)`` (float32 images ``[n, 64]``, integer labels).
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    return train_test_split(
        x, digits.target, test_size=test_size, random_state=seed, stratify=digits.target
    )


class MLP(nnx.Module):
    """NNX multilayer perceptron ``sizes[0] → ... → sizes[-1]``, ReLU between layers."""

    def __init__(self, sizes: tuple[int, ...], *, rngs: nnx.Rngs):
        self.layers = nnx.List(
            [nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:], strict=True)]
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self.layers[:-1]:
            x = jax.nn.relu(layer(x))
        return self.layers[-1](x)


def init_mlp(key: jax.Array, sizes: tuple[int, ...]) -> list[dict[str, jax.Array]]:
    """Parameters of the same MLP as a plain pytree (for ``jax.shard_map`` and friends)."""
    params = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        w = jax.random.normal(jax.random.fold_in(key, i), (a, b), jnp.float32) / np.sqrt(a)
        params.append({"w": w.astype(jnp.float32), "b": jnp.zeros((b,), jnp.float32)})
    return params


def mlp(params, x: jax.Array) -> jax.Array:
    """Applies :func:`init_mlp`'s parameters: ReLU between layers, linear output."""
    for layer in params[:-1]:
        x = jax.nn.relu(x @ layer["w"] + layer["b"])
    return x @ params[-1]["w"] + params[-1]["b"]
