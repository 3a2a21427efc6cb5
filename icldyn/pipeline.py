"""Train, analyse, plot and report a study as one call (shared by `icldyn demo` and `icldyn paper`).

`run_study(cfg, workdir)` is what a notebook calls to do what `make demo`
does for any config: `runner.train`, then `icldyn analyze`, the attention
patterns, the figures and report.md. `attention_patterns(workdir)` is the
one step `icldyn plot` adds before drawing.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Sequence

from icldyn import plots, report, runner
from icldyn.analysis import attention, command
from icldyn.errors import ConfigError
from icldyn.store import files

log = logging.getLogger(__name__)


def attention_patterns(workdir: str, runs: Sequence[int] | None = None,
                       steps: Sequence[int] | None = None) -> str | None:
  """Writes analysis/attention_patterns.npz where the workdir has checkpoints; its path or None.

  Args:
    workdir: a trained workdir.
    runs, steps: which runs and checkpoints (`analysis.attention`'s defaults:
      run 0 at its first checkpoint, nearest its phase change, and its last).
  """
  if not os.path.exists(os.path.join(workdir, files.CONFIG_JSON)):
    return None
  try:
    return attention.write_attention_patterns(workdir, runs, steps)
  except ConfigError as e:
    if runs is not None or steps is not None:
      raise  # the user's choice was wrong: say so
    log.info("Skipping attention patterns: %s", e)  # a workdir analysis cannot rebuild
    return None


def run_study(cfg, workdir: str, axes: list[str] | None = None, quiet: bool = False) -> dict[str, Any]:
  """Trains a grid (resuming), analyses it, draws its figures and writes its report.

  Args:
    cfg: the study config.
    workdir: output directory.
    axes: grid axes replacing the study's own.
    quiet: no progress lines and no timing table.

  Returns:
    `runner.train`'s summary with `figures` (paths) and `report` (path) added.

  Raises:
    As `runner.train` (ConfigError, Preempted, WorkdirError).
  """
  summary = runner.train(cfg, workdir, axes, quiet=quiet)
  command.analyze(workdir, quiet=quiet)
  attention_patterns(workdir)
  figures = plots.make_all(workdir)
  return {**summary, "figures": figures, "report": report.write_report(workdir)}
