"""`make paper-smoke`: every study's smoke variant, analysed and plotted, in one directory."""

import os

import pytest

from icldyn import paper


def test_paper_command_on_one_study(tmp_path):
  # `icldyn paper`'s loop (train, analyse, plot, report per study, then the toy
  # model) on the clamp study; every study's config is validated in
  # tests/test_studies.py, and the whole smoke paper runs with `make test-slow`.
  times = paper.run_paper(str(tmp_path), "smoke", quiet=True, studies=("subcircuits",))
  assert set(times) == {"subcircuits", "toy"}
  wd = tmp_path / "subcircuits"
  for name in ("metrics.csv", "runs.csv", "analysis/phase_changes.csv", "report.md"):
    assert (wd / name).exists(), name
  assert any(p.suffix == ".png" for p in (wd / "plots").iterdir())
  assert "layer1_copy" in (wd / "runs.csv").read_text()
  assert (tmp_path / "toy" / "toy.png").exists()


@pytest.mark.slow
def test_paper_smoke(tmp_path):
  times = paper.run_paper(str(tmp_path), "smoke", quiet=True)
  assert set(times) == set(paper.STUDIES) | {"toy"}
  for study in paper.STUDIES:
    wd = tmp_path / study
    for name in ("metrics.csv", "runs.csv", "analysis/phase_changes.csv", "report.md"):
      assert (wd / name).exists(), f"{study}/{name}"
    assert any(p.suffix == ".png" for p in (wd / "plots").iterdir()), study
  runs = (tmp_path / "subcircuits" / "runs.csv").read_text()
  assert "layer1_copy" in runs
  assert (tmp_path / "toy" / "toy.png").exists()
