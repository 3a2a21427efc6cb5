"""Analysis of training runs: progress measures and phase-change timing.

Submodules are imported by full path (`icldyn.analysis.timing`,
`icldyn.analysis.summary`, `icldyn.analysis.weights`), so importing the
numpy-only ones does not import JAX.
"""
