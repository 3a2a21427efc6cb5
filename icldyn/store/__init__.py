"""What icldyn keeps on disk: every workdir file's name and columns, and the checkpoints.

`files` declares each workdir file's name and columns once and writes them
crash-safely (config.json, runs.csv, metrics.csv, TensorBoard); it needs no
JAX, so the plots can read through it. `checkpoints` owns the orbax
checkpoint stream and resume states. Nothing here imports the rest of icldyn.
"""
