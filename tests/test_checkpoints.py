"""Checkpoints (icldyn.store.checkpoints): asynchronous saves, sealed after they finish.

A save returns while orbax writes in its background thread; the manifest is
written only once the write has finished (at the next save, `wait`, a read
or `close`); a process killed in between leaves a workdir that resumes from
the newest complete resume state, as with synchronous saves.
"""

import os

import numpy as np
import pytest

from icldyn.store import checkpoints as ckpt_lib
from conftest import run_python


def _state(step):
  return {"w": np.full((3, 4), step, np.float32), "t": np.int64(step)}


def test_a_save_is_sealed_only_after_it_finished(tmp_path):
  sealed = []
  store = ckpt_lib.Store(str(tmp_path), 0, on_sealed=lambda *a: sealed.append(a))
  store.save_state(100, _state(100))
  manifest = os.path.join(store.path("resume", 100), ckpt_lib.MANIFEST)
  # The seal is the caller's, never orbax's thread's: not there until waited for.
  assert not os.path.exists(manifest) and sealed == []
  store.save_params(100, {"w": np.ones((3, 4), np.float32)})  # seals the state first
  assert os.path.exists(manifest) and sealed == [("resume", 100, store.path("resume", 100))]
  store.wait()
  assert sealed[-1] == ("stream", 100, store.path("stream", 100))
  assert ckpt_lib.check(store.path("stream", 100)) is None
  for step in (200, 300):
    store.save_state(step, _state(step))
  store.close()  # seals the last; two resume states kept, removed only once the new one is sealed
  store = ckpt_lib.Store(str(tmp_path), 0, read_only=True)
  assert store.resume_steps() == [200, 300]
  step, got, damaged = store.restore_latest_state(_state(0))
  assert step == 300 and not damaged and np.all(got["w"] == 300)
  store.close()


# A process that seals resume state 100, then dies inside the second save.
_KILLED = """
import numpy as np
from icldyn.store import checkpoints as ckpt_lib
store = ckpt_lib.Store({wd!r}, 0)
for step in (100, 200):
  store.save_state(step, {{"w": np.full((3, 4), step, np.float32), "t": np.int64(step)}})
store.close()
print("not killed")
"""


def _killed(wd, fault, monkeypatch):
  monkeypatch.setenv("ICLDYN_FAULT", fault)  # icldyn/faults.py: SIGKILL at the point
  try:
    run_python(_KILLED.format(wd=wd))
  except AssertionError as e:  # run_python reports the exit status
    assert "failed (-9)" in str(e), e
  else:
    raise AssertionError(f"{fault} did not kill the process")


def test_killed_while_an_async_save_is_written_resumes_from_the_previous_one(tmp_path,
                                                                           monkeypatch):
  wd = str(tmp_path / "wd")
  _killed(wd, "in_checkpoint:2", monkeypatch)  # resume/200 still in orbax's temporary directory
  store = ckpt_lib.Store(wd, 0)
  step, got, damaged = store.restore_latest_state(_state(0))
  assert step == 100 and not damaged and np.all(got["w"] == 100)
  assert store.resume_steps() == [100]
  store.save_state(200, _state(200))  # redone, as a resumed training does
  store.close()
  # Orbax clears the temporary directory in the background, before its first save.
  assert sorted(os.listdir(os.path.join(wd, "checkpoints", "g0", "resume"))) == ["100", "200"]


# A subprocess: 12 s on 2 loaded cores. test_reliability's chain of kills covers the point too.
@pytest.mark.slow
def test_killed_after_an_async_save_before_its_seal_resumes_from_it(tmp_path, monkeypatch):
  wd = str(tmp_path / "wd")
  _killed(wd, "before_manifest:2", monkeypatch)  # resume/200 complete (renamed), not sealed
  path = os.path.join(wd, "checkpoints", "g0", "resume", "200")
  assert os.path.isdir(path) and not os.path.exists(os.path.join(path, ckpt_lib.MANIFEST))
  store = ckpt_lib.Store(wd, 0)
  step, got, damaged = store.restore_latest_state(_state(0))
  assert step == 200 and not damaged and np.all(got["w"] == 200)
  assert ckpt_lib.check(path) is None  # sealed now
  store.close()

