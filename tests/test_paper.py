"""`make paper-smoke`: every study's smoke variant, analysed and plotted, in one directory."""

import os

import pytest

from icldyn import cli
from icldyn import paper


@pytest.mark.slow  # a whole study through `icldyn paper`: over 2 minutes on 2 cores
def test_paper_command_on_one_study(tmp_path, monkeypatch, capsys):
  # `icldyn paper --smoke` (the command's flags and its call of run_paper) and
  # run_paper's loop (train, analyse, plot, report per study, then the toy
  # model) on the clamp study only; every study's config is validated in
  # tests/test_studies.py, and the whole smoke paper runs with `make test-slow`.
  calls = []
  run_paper = paper.run_paper

  def one_study(outdir, variant="", quiet=False, **kwargs):
    calls.append((outdir, variant, quiet))
    return run_paper(outdir, variant, quiet, studies=("subcircuits",))

  monkeypatch.setattr(paper, "run_paper", one_study)
  assert cli.main(["paper", "--outdir", str(tmp_path), "--smoke", "--quiet"]) == 0
  assert calls == [(str(tmp_path), "smoke", True)]
  err = capsys.readouterr().err
  assert "subcircuits" in err and os.path.join(str(tmp_path), "toy") in err
  wd = tmp_path / "subcircuits"
  for name in ("metrics.csv", "runs.csv", "analysis/phase_changes.csv", "report.md"):
    assert (wd / name).exists(), name
  assert any(p.suffix == ".png" for p in (wd / "plots").iterdir())
  assert "layer1_copy" in (wd / "runs.csv").read_text()
  assert (tmp_path / "toy" / "toy.png").exists()


@pytest.mark.parametrize("argv, variant", [([], ""), (["--variant", "cpu"], "cpu"),
                                           (["--variant", "smoke"], "smoke")])
def test_paper_command_passes_its_variant(tmp_path, monkeypatch, argv, variant):
  calls = []
  monkeypatch.setattr(paper, "run_paper", lambda *a: calls.append(a) or {})
  assert cli.main(["paper", "--outdir", str(tmp_path), *argv]) == 0
  assert calls == [(str(tmp_path), variant, False)]


def test_paper_command_refuses_an_unknown_variant(tmp_path, monkeypatch):
  monkeypatch.setattr(paper, "run_paper", lambda *a: pytest.fail("ran"))
  with pytest.raises(SystemExit) as e:  # argparse: usage error, exit 2
    cli.main(["paper", "--outdir", str(tmp_path), "--variant", "huge"])
  assert e.value.code == 2


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
