"""XLA compiler options for the grid programs, per backend.

One option, measured in docs/performance.md: on CPU, XLA hands dots,
reductions and elementwise fusions to the YNNPACK library by default. Its
reductions over the tiny axes of the paper model (5 tokens, 8 dims per head)
cost 3-6 ms each per 64-run grid step, against ~1 ms for XLA's own loops, so
only dots go to YNNPACK. This changes float rounding only (a sum's order), not
what is computed; every run of a program is still computed the same way, so
the determinism guarantees of the README hold unchanged.
"""

from __future__ import annotations

_CPU = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"}


def compiler_options(backend: str) -> dict[str, str]:
  """Options for `jax.stages.Lowered.compile(compiler_options=...)` on `backend`."""
  return dict(_CPU) if backend == "cpu" else {}
