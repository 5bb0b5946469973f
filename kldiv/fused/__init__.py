"""Memory-light implementations of :func:`kldiv.kl_from_logits` (floor 3 of the package).

- :mod:`kldiv.fused.chunked` — ``impl="chunked"``: row chunks, a custom VJP that saves only the
  inputs and per-row statistics (O(N) extra memory); the CPU/TPU path.
- :mod:`kldiv.fused.pallas` — ``impl="pallas"``: a Pallas/Triton row kernel (Pallas interpret mode
  off GPU); imported only when used.

Both compute the numerics of ``kldiv._numerics`` on inputs cast, tempered and masked by the one
``kldiv._logits.temper_and_mask`` (per row chunk or vocabulary block here, so no ``[N, V]`` copy of
the inputs in the compute dtype is made): ``where``, temperature and edge semantics are those of
the XLA path. They import only lower floors (``_checks``, ``_numerics``, ``_logits``); the
``impl=`` dispatch sits above them, in :mod:`kldiv.discrete`. The fused linear-head losses live in
:mod:`kldiv.fused_linear`.
"""

__all__: list[str] = []
