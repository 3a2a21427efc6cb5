"""Bad input: every malformed config, grid, data file or workdir is refused with one
line `icldyn: error: FIELD: message` and exit code 2, before any training or writing.

The cases below are also the table in docs/bad_inputs.md; regenerate it with
`.venv/bin/python tests/test_bad_inputs.py` (it rewrites the table; a test
checks that every message there is current).
"""

import contextlib
import fcntl
import hashlib
import io
import json
import os
import subprocess

import h5py
import numpy as np
import pytest

from icldyn import build, cli
from conftest import ROOT

STUDY = os.path.join(ROOT, "experiments", "ih_paper.py") + ":smoke"
# A small file-backed data set: 12 + 6 classes of 5 exemplars in 8 dimensions.
FILE_ARGS = ["--config.data.source=file", "--config.data.dim=8",
             "--config.data.num_train_classes=12", "--config.data.num_test_classes=6"]
DOC = os.path.join(ROOT, "docs", "bad_inputs.md")


def _data(path):
  return FILE_ARGS + [f"--config.data.path={{tmp}}/{path}"]


# (id, what is wrong, extra command-line arguments, expected start of the message).
# {tmp} is a directory holding the files made by `_make_files`; {wd} the workdir.
CASES = [
    # Study files and config fields.
    ("study_missing", "study file does not exist", ["--config", "{tmp}/nope.py"],
     "--config: no such study file"),
    ("study_syntax", "study file has a syntax error", ["--config", "{tmp}/syntax.py"],
     "--config: cannot import"),
    ("study_no_get_config", "study file defines no get_config", ["--config", "{tmp}/empty.py"],
     "--config: "),
    ("study_returns_none", "get_config returns None", ["--config", "{tmp}/none.py"],
     "--config: {tmp}/none.py: get_config must return an ml_collections.ConfigDict"),
    ("study_typo_field", "study sets a misspelt field inside `unlocked()`",
     ["--config", "{tmp}/typo.py"], "train.learing_rate: unknown config field"),
    ("study_wrong_type", "study sets a string where an int belongs",
     ["--config", "{tmp}/wrong_type.py"], "--config: "),
    ("unknown_variant", "unknown study variant", ["--config", STUDY.replace(":smoke", ":huge")],
     "--config: "),
    ("unknown_field", "unknown field", ["--config.model.nope=1"], "model.nope: unknown config field"),
    ("wrong_type", "wrong type", ["--config.model.num_heads=four"],
     "model.num_heads: expected int"),
    ("float_for_int", "float for an int", ["--config.model.num_heads=2.5"],
     "model.num_heads: expected int"),
    ("bad_bool", "not a bool", ["--config.model.layer_norm=maybe"],
     "model.layer_norm: expected bool"),
    ("override_no_value", "override without a value", ["--config.train.batch_size"],
     "train.batch_size: override needs a value"),
    ("nan_lr", "NaN learning rate", ["--config.train.learning_rate=nan"],
     "train.learning_rate: must be a finite number"),
    ("negative_lr", "negative learning rate", ["--config.train.learning_rate=-1e-3"],
     "train.learning_rate: must be a finite number >= 0"),
    ("heads_width", "width not a multiple of the heads", ["--config.model.d_model=60"],
     "model.d_model: must be a positive multiple"),
    ("unknown_optimizer", "unknown optimizer", ["--config.train.optimizer=lion"],
     "train.optimizer: must be one of"),
    ("matmul_precision", "unknown matrix-product precision",
     ["--config.train.matmul_precision=fp8"],
     "train.matmul_precision: must be one of float32, tf32, bf16, got 'fp8'"),
    ("matmul_precision_typo", "misspelt matrix-product precision",
     ["--config.train.matmul_precision=flaot32"],
     "train.matmul_precision: must be one of float32, tf32, bf16, got 'flaot32'; "
     "did you mean float32?"),
    ("batch_zero", "batch size 0", ["--config.train.batch_size=0"],
     "train.batch_size: must be >= 1"),
    ("too_few_sequences", "fewer sequences than one batch", ["--config.train.num_sequences=8"],
     "train.num_sequences: must be at least one batch"),
    ("eval_every_zero", "evaluation every 0 sequences", ["--config.train.eval_every=0"],
     "train.eval_every: must be >= 1"),
    ("negative_seed", "negative seed", ["--config.seeds.init=-1"],
     "seeds.init: must be an integer in [0, 2^31)"),
    ("unknown_evaluator", "unknown evaluator", ["--config.eval.evaluators=fsl_train,fsl_typo"],
     "eval.evaluators: unknown evaluator"),
    ("checkpoint_steps", "checkpoint steps not numbers", ["--config.checkpoint.steps=100,abc"],
     "checkpoint.steps: not a number"),
    # Impossible data settings.
    ("burstiness", "burstiness larger than the context", ["--config.data.burstiness=3"],
     "data.burstiness: must be in [0, data.context_len=2]"),
    ("labels_classes", "more labels than classes", ["--config.data.num_labels=60"],
     "data.num_labels: more labels"),
    ("one_label", "a single label", ["--config.data.num_labels=1"], "data.num_labels: must be >= 2"),
    ("holdout", "all label pairs held out", ["--config.data.label_holdout=1.0"],
     "data.label_holdout: must be in [0, 1)"),
    ("no_test_classes", "fsl_test_class without test classes",
     ["--config.data.num_test_classes=0"], "data.num_test_classes: fsl_test_class needs"),
    # Grids.
    ("grid_empty", "grid axis without values", ["--grid", "seeds.init="],
     "--grid: expected FIELD=V1,V2,..."),
    ("grid_only_commas", "grid axis of empty values", ["--grid", "seeds.init=,"],
     "seeds.init: expected int, got ''"),
    ("grid_no_equals", "grid axis without '='", ["--grid", "seeds.init"],
     "--grid: expected FIELD=V1,V2,..."),
    ("grid_unknown_field", "grid over an unknown field", ["--grid", "model.nonexistent=1,2"],
     "model.nonexistent: unknown config field"),
    ("grid_wrong_type", "grid value of the wrong type", ["--grid", "seeds.init=0,x"],
     "seeds.init: expected int"),
    ("grid_twice", "the same field in two axes", ["--grid", "seeds.init=0,1", "--grid",
                                                  "seeds.init=2,3"],
     "seeds.init: appears in two grid axes"),
    ("grid_zip", "zipped axis with a missing part", ["--grid", "seeds.init+seeds.data=0/1,2"],
     "seeds.init+seeds.data: zipped value '2' needs 2 parts"),
    ("grid_bad_run", "one run of the grid is impossible", ["--grid", "data.num_labels=5,500"],
     "data.num_labels: more labels"),
    # Data files.
    ("data_missing", "data file does not exist", _data("nope.npy"), "data.path: no such file"),
    ("data_no_path", "data.source=file without a path", FILE_ARGS, "data.path: data.source=file needs a path"),
    ("data_directory", "data path is a directory", _data("adir"), "data.path: no such file"),
    ("data_extension", "unsupported file type", _data("data.txt"),
     "data.path: unsupported file type '.txt'"),
    ("data_2d", "array of the wrong rank", _data("flat.npy"),
     "data.path: expected a [classes, exemplars, dim] array, got shape (18, 40)"),
    ("data_nan", "NaN in the data", _data("nan.npy"), "data.path: {tmp}/nan.npy holds NaN or inf"),
    ("data_inf", "inf in the data", _data("inf.npy"), "data.path: {tmp}/inf.npy holds NaN or inf"),
    ("data_dim", "wrong dimension", _data("dim7.npy"), "data.dim: {tmp}/dim7.npy has dim 7"),
    ("data_exemplars", "too few exemplars per class", _data("ex3.npy"),
     "data.num_exemplars: {tmp}/ex3.npy has 3 exemplars per class"),
    ("data_classes", "too few classes", _data("classes10.npy"),
     "data.num_train_classes: 12 training + 6 test classes exceed the 10 classes"),
    ("data_garbage", "not an array file", _data("garbage.npy"),
     "data.path: {tmp}/garbage.npy is not a .npy file"),
    ("data_empty_file", "empty file", _data("empty.npy"),
     "data.path: {tmp}/empty.npy is not a .npy file"),
    ("data_truncated", "truncated .npy file", _data("truncated.npy"), "data.path: cannot read"),
    ("data_strings", "strings instead of numbers", _data("strings.npy"), "data.path: "),
    ("data_npz_key", ".npz without the dataset key", _data("multi.npz"),
     "data.dataset_key: no array 'resnet18/224/feat'"),
    ("data_h5_key", ".h5 without the dataset key", _data("other.h5"),
     "data.dataset_key: no dataset 'resnet18/224/feat'"),
    # Workdirs.
    ("workdir_file", "workdir is a file", ["--workdir", "{tmp}/afile"],
     "--workdir: {tmp}/afile exists and is not a directory"),
    ("workdir_under_file", "workdir under a file", ["--workdir", "{tmp}/afile/wd"],
     "--workdir: {tmp}/afile is a file"),
    ("workdir_foreign", "workdir holds someone else's files", ["--workdir", "{tmp}/foreign"],
     "--workdir: {tmp}/foreign is not empty and is not an icldyn workdir"),
    ("workdir_other_config", "workdir holds another config (no --overwrite)",
     ["--workdir", "{tmp}/other", "--config.train.learning_rate=3e-5"],
     "--workdir: {tmp}/other holds a different config (differs in: config.train.learning_rate)"),
    ("workdir_bad_json", "workdir's config.json is not JSON", ["--workdir", "{tmp}/badjson"],
     "--workdir: {tmp}/badjson/config.json is unreadable"),
    ("workdir_in_use", "another icldyn process trains in the workdir",
     ["--workdir", "{tmp}/locked"], "--workdir: {tmp}/locked is in use by another icldyn process"),
    ("workdir_read_only", "read-only workdir", ["--workdir", "{tmp}/ro/wd"], "--workdir: "),
]


def _make_files(tmp):
  """The inputs the cases name, under `tmp`."""
  def write(name, text):
    with open(os.path.join(tmp, name), "w") as f:
      f.write(text)
  write("syntax.py", "def get_config(arg:\n")
  write("empty.py", "x = 1\n")
  write("none.py", "def get_config(arg=''):\n  return None\n")
  write("typo.py", "from icldyn.config import base_config\n"
                   "def get_config(arg=''):\n  c = base_config()\n  with c.unlocked():\n"
                   "    c.train.learing_rate = 1e-4\n  return c\n")
  write("wrong_type.py", "from icldyn.config import base_config\n"
                         "def get_config(arg=''):\n  c = base_config()\n"
                         "  c.model.num_heads = 'eight'\n  return c\n")
  rng = np.random.default_rng(0)
  good = rng.normal(size=(18, 5, 8)).astype(np.float32)
  np.save(os.path.join(tmp, "flat.npy"), good.reshape(18, 40))
  for name, value in (("nan", np.nan), ("inf", np.inf)):
    bad = good.copy()
    bad[3, 1, 2] = value
    np.save(os.path.join(tmp, f"{name}.npy"), bad)
  np.save(os.path.join(tmp, "dim7.npy"), good[:, :, :7])
  np.save(os.path.join(tmp, "ex3.npy"), good[:, :3])
  np.save(os.path.join(tmp, "classes10.npy"), good[:10])
  np.save(os.path.join(tmp, "strings.npy"), np.full((18, 5, 8), "x"))
  np.savez(os.path.join(tmp, "multi.npz"), a=good, b=good)
  with h5py.File(os.path.join(tmp, "other.h5"), "w") as f:
    f.create_dataset("other", data=good)
  with open(os.path.join(tmp, "garbage.npy"), "wb") as f:
    f.write(rng.bytes(300))
  open(os.path.join(tmp, "empty.npy"), "wb").close()
  with open(os.path.join(tmp, "ex3.npy"), "rb") as f:
    whole = f.read()
  with open(os.path.join(tmp, "truncated.npy"), "wb") as f:
    f.write(whole[:len(whole) // 2])
  write("data.txt", "1 2 3\n")
  os.makedirs(os.path.join(tmp, "adir"))
  write("afile", "not a directory\n")
  os.makedirs(os.path.join(tmp, "foreign"))
  write("foreign/thesis.tex", "\\documentclass{article}\n")
  os.makedirs(os.path.join(tmp, "other"))
  from icldyn import config as config_lib
  cfg = config_lib.load_config(STUDY)
  write("other/config.json", json.dumps(build.prepare(cfg).resolved()))
  os.makedirs(os.path.join(tmp, "badjson"))
  write("badjson/config.json", '{"config": {"model"')
  os.makedirs(os.path.join(tmp, "locked"))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
  tmp = str(tmp_path_factory.mktemp("inputs"))
  _make_files(tmp)
  return tmp


def _snapshot(path):
  """Every file and directory under `path` with its content hash (None if absent)."""
  if not os.path.exists(path):
    return None
  out = {}
  for root, dirs, files in os.walk(path):
    for d in dirs:
      out[os.path.relpath(os.path.join(root, d), path)] = "dir"
    for f in files:
      p = os.path.join(root, f)
      out[os.path.relpath(p, path)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
  return out


def _argv(extra, tmp, wd):
  args = [a.format(tmp=tmp) for a in extra]
  if "--config" not in args:
    args = ["--config", STUDY] + args
  if "--workdir" not in args:
    args = ["--workdir", wd] + args
  return ["train"] + args


def run_case(case, tmp):
  """Runs one case through the CLI in this process; returns (exit code, stderr lines)."""
  err = io.StringIO()
  with contextlib.redirect_stderr(err):
    code = cli.main(_argv(case[2], tmp, os.path.join(tmp, f"wd_{case[0]}")))
  return code, err.getvalue().strip().splitlines()


@pytest.fixture
def read_only_dir(inputs):
  """{tmp}/ro made read-only: chmod for a normal user; a read-only mount for root
  (root writes through any mode bits)."""
  ro = os.path.join(inputs, "ro")
  os.makedirs(ro, exist_ok=True)
  if os.geteuid() != 0:
    os.chmod(ro, 0o555)
    yield ro
    os.chmod(ro, 0o755)
    return
  out = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", ro],
                       capture_output=True, text=True)
  if out.returncode != 0:
    pytest.skip("running as root, where chmod does not stop writes, and a read-only "
                f"file system cannot be mounted: {out.stderr.strip()}")
  yield ro
  subprocess.run(["umount", "-l", ro], check=False)


@contextlib.contextmanager
def _held_lock(tmp):
  """{tmp}/locked with its lock held, as by another `icldyn train` (pid 4242)."""
  fd = os.open(os.path.join(tmp, "locked", ".lock"), os.O_RDWR | os.O_CREAT)
  fcntl.flock(fd, fcntl.LOCK_EX)
  os.pwrite(fd, b"4242", 0)
  try:
    yield
  finally:
    os.close(fd)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_nothing_written(case, inputs, request):
  if case[0] == "workdir_read_only":
    request.getfixturevalue("read_only_dir")
  argv = _argv(case[2], inputs, os.path.join(inputs, f"wd_{case[0]}"))
  workdir = argv[argv.index("--workdir") + 1]
  with _held_lock(inputs) if case[0] == "workdir_in_use" else contextlib.nullcontext():
    before = _snapshot(workdir)
    code, err = run_case(case, inputs)
  assert code == cli.EXIT_BAD_INPUT, err
  assert len(err) == 1, err
  assert err[0].startswith("icldyn: error: " + case[3].format(tmp=inputs)), err[0]
  assert _snapshot(workdir) == before  # nothing written (or created)


def _rows(tmp):
  """The table rows: each case (but the read-only one) with the message it gives."""
  rows = []
  for case in CASES:
    if case[0] == "workdir_read_only":
      continue  # its message depends on how the directory is read-only (see the doc)
    with _held_lock(tmp) if case[0] == "workdir_in_use" else contextlib.nullcontext():
      _, err = run_case(case, tmp)
    cid, what, extra, _ = case
    args = " ".join(a for a in extra if a not in FILE_ARGS)
    if any(a in FILE_ARGS for a in extra):
      args = "(file source) " + args
    args = args.replace("{tmp}", "TMP").replace(ROOT + "/", "")
    message = err[0].replace(tmp, "TMP").replace(ROOT + "/", "")
    rows.append(f"| {what} | `{args}` | `{message}` |".replace("|`", "| `"))
  return rows


def test_the_table_in_the_docs_is_current(inputs):
  """docs/bad_inputs.md lists every case with the message it gives now."""
  doc = open(DOC).read()
  stale = [row for row in _rows(inputs) if row not in doc]
  assert not stale, ("regenerate: .venv/bin/python tests/test_bad_inputs.py\n"
                     + "\n".join(stale))


if __name__ == "__main__":
  import tempfile
  tmp = tempfile.mkdtemp()
  _make_files(tmp)
  head = open(DOC).read().split("<!-- table -->")[0]
  table = ("| input | arguments after `icldyn train --config experiments/ih_paper.py:smoke "
           "--workdir WD` | the one line on stderr |\n|---|---|---|\n" + "\n".join(_rows(tmp)))
  # Read the head before writing: a shell redirection would empty the file first.
  with open(DOC, "w") as f:
    f.write(head + "<!-- table -->\n" + table + "\n")
  print(f"wrote {DOC}")
