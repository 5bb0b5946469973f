"""What the tests need from JAX across the supported versions (0.7.1 to the pinned one)."""

import jax

try:  # JAX ≥ 0.8
    enable_x64 = jax.enable_x64
except AttributeError:  # JAX 0.7
    from jax.experimental import enable_x64  # noqa: F401

try:  # JAX ≥ 0.8
    unregister_event_duration_listener = jax.monitoring.unregister_event_duration_listener
except AttributeError:  # JAX 0.7
    from jax._src.monitoring import (  # noqa: F401
        _unregister_event_duration_listener_by_callback as unregister_event_duration_listener,
    )
