"""`icldyn paper`: every study of Singh et al. 2024 in sequence, with analysis and plots.

    icldyn paper --outdir runs/paper [--variant ''|cpu|smoke]

Each study trains into `OUTDIR/<study>/` (resuming if interrupted), then is
analysed and plotted; the toy model writes `OUTDIR/toy/`. `make paper` runs the
paper's settings, `make paper-cpu` the CPU-budget variants, `make paper-smoke`
every study's smoke variant (part of the test suite).
"""

from __future__ import annotations

import logging
import os
import sys
import time

from icldyn import pipeline
from icldyn import studies as studies_lib
from icldyn import toy as toy_lib

log = logging.getLogger(__name__)

STUDIES = ("ih_paper", "single_head", "subcircuits", "data_dependence")


def run_paper(outdir: str, variant: str = "", quiet: bool = False,
              studies: tuple[str, ...] = STUDIES, toy: bool = True) -> dict:
  """Trains, analyses and plots every study; returns {study: seconds}.

  Args:
    outdir: one directory for all studies.
    variant: '' (paper settings), 'cpu' or 'smoke'.
    quiet: no progress lines.
    studies: which studies to run.
    toy: also run the toy model.
  """
  times = {}
  for study in studies:
    t0 = time.time()
    cfg = studies_lib.load(study + (f":{variant}" if variant else ""))
    workdir = os.path.join(outdir, study)
    if not quiet:
      print(f"[icldyn] paper: {study} ({variant or 'paper'} variant) -> {workdir}",
            file=sys.stderr, flush=True)
    pipeline.run_study(cfg, workdir, quiet=quiet)
    times[study] = time.time() - t0
  if toy:
    t0 = time.time()
    cfg = studies_lib.load("toy" + (":smoke" if variant == "smoke" else ""))
    toy_lib.run_toy_study(os.path.join(outdir, "toy"), toy_lib.ToyConfig.from_mapping(cfg.toy),
                          list(cfg.init_seeds), clamps=tuple(cfg.clamps), level=cfg.level)
    times["toy"] = time.time() - t0
  return times
