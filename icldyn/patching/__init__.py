"""Circuit discovery over training: activation patching, path patching, knockouts, circuit scores.

`core` owns the interventions on one run (pure JAX, vmapped over the
runs of a group by `program`), `program` the compiled whole-group
program applied to the checkpoint stream, `command` `icldyn patch`
(analysis/patching.csv, edge timings in analysis/phase_changes.csv,
analysis/circuit.csv). The corruptions are the tasks' own
(`icldyn.tasks.corrupt`). Formulas: Wang et al. 2022 (arXiv 2211.00593),
in `core`'s docstring.
"""
