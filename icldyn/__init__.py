"""icldyn: training dynamics of in-context-learning circuits, as grids compiled into one program.

Data flows one way: config → grid → task → model (+clamps) → train (vmap runs ·
scan steps · shard) → checkpoints + metrics → analysis → plots.

The public Python API (docs/python_api.md), imported on first use so that
`import icldyn` stays light and the plots stay free of JAX:

    load(workdir) -> Workdir        a trained workdir: tables, runs, checkpoints, forward passes
    Workdir, Run                    (icldyn.api)
    Cache                           activations by name (icldyn.model.cache)
    Clamp                           a clamp's value and mask (icldyn.model.clamp)
    custom_clamp(fn, **kwargs)      a Python function as a clamp (icldyn.clamps.custom)
    measure                         decorator registering a custom progress measure (icldyn.analysis.custom)
    load_config(study, **fields)    a study's config by name ("ih_paper:smoke") or path
    list_studies()                  the bundled studies. names
    train(config, workdir, ...)     `icldyn train` as a function; returns the Workdir
    Callbacks, TrainingEvent        host-side hooks on training events (icldyn.runner)
    analyze(workdir, ...)           `icldyn analyze`; returns the paths written
    plot(workdir, ...)              `icldyn plot`; returns the paths written
"""

__version__ = "0.1.0"

# name -> (module, attribute): what the lazy face exposes.
PUBLIC = {
    "load": ("icldyn.api", "load"),
    "Workdir": ("icldyn.api", "Workdir"),
    "Run": ("icldyn.api", "Run"),
    "load_config": ("icldyn.api", "load_config"),
    "train": ("icldyn.api", "train"),
    "analyze": ("icldyn.api", "analyze"),
    "plot": ("icldyn.api", "plot"),
    "Callbacks": ("icldyn.runner", "Callbacks"),
    "TrainingEvent": ("icldyn.runner", "TrainingEvent"),
    "Cache": ("icldyn.model.cache", "Cache"),
    "Clamp": ("icldyn.model.clamp", "Clamp"),
    "custom_clamp": ("icldyn.clamps.custom", "custom_clamp"),
    "measure": ("icldyn.analysis.custom", "measure"),
    "list_studies": ("icldyn.studies", "names"),
}

__all__ = sorted(PUBLIC)


def __getattr__(name: str):
  """Imports a public name on first use (PEP 562)."""
  if name not in PUBLIC:
    raise AttributeError(f"module 'icldyn' has no attribute {name!r}; the public names are "
                         f"{', '.join(__all__)} (docs/python_api.md)")
  import importlib
  module, attr = PUBLIC[name]
  value = getattr(importlib.import_module(module), attr)
  globals()[name] = value
  return value


def __dir__():
  return sorted(list(globals()) + __all__)
