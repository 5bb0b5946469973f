"""Shared test configuration: float64 references need x64."""

import jax

jax.config.update("jax_enable_x64", True)
