"""Tasks as plug-ins: every task registered by name (see `icldyn.tasks.base`).

`get(name)` returns a task's host-side definition; `TASKS` lists them all.
Adding a task is one module here plus its study file (docs/tasks.md).
"""

from __future__ import annotations

from icldyn.errors import ConfigError, did_you_mean
from icldyn.tasks import fewshot, repeat_tokens
from icldyn.tasks.base import Layout as Layout
from icldyn.tasks.base import Targets as Targets
from icldyn.tasks.base import Task as Task
from icldyn.tasks.base import TaskSpec as TaskSpec

TASKS: dict[str, Task] = {t.name: t for t in (fewshot.TASK, repeat_tokens.TASK)}


def get(name: str) -> Task:
  """The task registered as `name` (ConfigError naming `task.name` otherwise)."""
  task = TASKS.get(name)
  if task is None:
    raise ConfigError("task.name", f"unknown task {name!r}{did_you_mean(name, TASKS)} "
                      f"(known: {', '.join(TASKS)})")
  return task
