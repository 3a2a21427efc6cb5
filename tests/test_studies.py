"""Every study file and variant loads and validates (without training).

A study's variants are configs users run for minutes to hours; an error in one
should surface here, not after its smoke variant has passed.
"""

import os

import pytest

from icldyn import build
from icldyn import grid as grid_lib
from icldyn import config as config_lib
from icldyn.errors import ConfigError
from conftest import ROOT

EXPERIMENTS = os.path.join(ROOT, "experiments")
# Study file -> its variants ('' is the default). toy.py is the toy model's
# own config (`icldyn toy`), not a grid.
VARIANTS = {
    "demo.py": ("", "smoke"),
    "ih_paper.py": ("", "seeds", "cpu", "smoke"),
    "single_head.py": ("", "cpu", "smoke"),
    "subcircuits.py": ("", "cpu", "smoke"),
    "data_dependence.py": ("", "cpu", "smoke"),
    "repeat_tokens.py": ("", "cpu", "smoke"),
}


def test_every_study_file_is_listed():
  studies = {n for n in os.listdir(EXPERIMENTS) if n.endswith(".py") and not n.startswith("_")}
  assert studies - {"toy.py"} == set(VARIANTS)


@pytest.mark.parametrize("study,variant", [(s, v) for s, vs in VARIANTS.items() for v in vs])
def test_study_variant_validates(study, variant):
  spec = os.path.join(EXPERIMENTS, study) + (f":{variant}" if variant else "")
  cfg = config_lib.load_config(spec)
  runs = grid_lib.expand(cfg, list(cfg.grid))
  assert runs
  for run in runs:
    build.validate(run)


def test_an_unknown_variant_is_a_config_error():
  with pytest.raises(ConfigError, match="unknown variant"):
    config_lib.load_config(os.path.join(EXPERIMENTS, "ih_paper.py") + ":nope")
