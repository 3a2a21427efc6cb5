"""XLA compiler options for the grid programs, per backend.

CPU, measured in docs/performance.md: XLA hands dots, reductions and
elementwise fusions to the YNNPACK library by default. Its reductions over
the tiny axes of the paper model (5 tokens, 8 dims per head) cost 3-6 ms each
per 64-run grid step, against ~1 ms for XLA's own loops, so only dots go to
YNNPACK. This changes float rounding only (a sum's order), not what is
computed; every run of a program is still computed the same way, so the
determinism guarantees of the README hold unchanged.

GPU: `xla_gpu_deterministic_ops`. XLA GPU autotunes its matrix-product
kernels when it compiles, timing candidates, so two processes compiling the
same program can pick different kernels whose sums round differently; and it
may run scatters, and some products, with atomics. The flag turns autotuning
off and makes those operations deterministic, so a re-run, a resumed run and
`icldyn densify` compute bitwise what the first run did (README:
Determinism; `make gpu-check` tests it). The embedding gradients do not rely
on it: they are one-hot products on accelerators (`icldyn.model.take_rows`).

TPU: XLA TPU is deterministic run to run without options.
"""

from __future__ import annotations

_CPU = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"}
_GPU = {"xla_gpu_deterministic_ops": "true"}


def compiler_options(backend: str) -> dict[str, str]:
  """Options for `jax.stages.Lowered.compile(compiler_options=...)` on `backend`
  (`jax.default_backend()`: 'cpu', 'gpu' for CUDA and ROCm, 'tpu')."""
  if backend == "cpu":
    return dict(_CPU)
  if backend in ("gpu", "cuda", "rocm"):
    return dict(_GPU)
  return {}
