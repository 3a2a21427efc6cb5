"""The bundled studies, found by name: `ih_paper:smoke` wherever icldyn is installed.

Each study is a module of this package with `get_config(arg)` (the config
of variant `arg`) and `VARIANTS` (variant -> one line); its docstring says
what it runs and the exact command. The clone's `experiments/` directory
links to the same files, so `--config experiments/ih_paper.py:smoke` and
`--config ih_paper:smoke` load the same study. A path to a file of your
own (`my_study.py:variant`) is loaded as before.
"""

from __future__ import annotations

import importlib
import os

import ml_collections

from icldyn import config as config_lib
from icldyn.errors import ConfigError, did_you_mean

HERE = os.path.dirname(os.path.abspath(__file__))
NOT_STUDIES = ("__init__", "common")


def names() -> list[str]:
  """The bundled studies' names."""
  return sorted(n[:-3] for n in os.listdir(HERE)
                if n.endswith(".py") and n[:-3] not in NOT_STUDIES)


def resolve(spec: str) -> str:
  """`NAME[:variant]` of a bundled study as `PATH[:variant]`; a path is returned as it is.

  Raises:
    ConfigError('--config', ...): neither a file nor a bundled study (with
      the closest names).
  """
  path, sep, arg = spec.partition(":")
  if os.path.isfile(path) or os.sep in path or path.endswith(".py"):
    return spec
  if path in names():
    return os.path.join(HERE, path + ".py") + sep + arg
  raise ConfigError("--config", f"no study file or bundled study {path!r}"
                    f"{did_you_mean(path, names())} (bundled: {', '.join(names())}; "
                    "`icldyn list` describes them)")


def load(spec: str) -> ml_collections.ConfigDict:
  """The config of a study by name (`ih_paper:smoke`) or path (`my_study.py:arg`)."""
  return config_lib.load_config(resolve(spec))


def catalogue() -> list[tuple[str, dict[str, str], str]]:
  """(name, {variant: one line}, the docstring's first line) of every bundled study."""
  out = []
  for name in names():
    module = importlib.import_module(f"icldyn.studies.{name}")
    doc = (module.__doc__ or "").strip().splitlines()
    out.append((name, dict(getattr(module, "VARIANTS", {"": ""})), doc[0] if doc else ""))
  return out


def describe() -> str:
  """The text `icldyn list` prints: each study, its variants and one line each."""
  lines = []
  for name, variants, headline in catalogue():
    lines.append(f"{name}: {headline}")
    for v, line in variants.items():
      label = f"{name}:{v}" if v else name
      lines.append(f"    --config {label:<24} {line}")
  return "\n".join(lines)
