"""Grid expansion, zips, compile groups and capacity padding."""

import pytest

from icldyn import grid as grid_lib
from icldyn.config import ConfigError
from conftest import tiny_config


def test_product_order_and_values():
  runs = grid_lib.expand(tiny_config(), ["seeds.init=0,1", "data.num_labels=5,6,7"])
  assert [(r.seeds.init, r.data.num_labels) for r in runs] == [
      (0, 5), (0, 6), (0, 7), (1, 5), (1, 6), (1, 7)]


def test_zip_axis():
  runs = grid_lib.expand(tiny_config(), ["seeds.init+seeds.data=0/10,1/11"])
  assert [(r.seeds.init, r.seeds.data) for r in runs] == [(0, 10), (1, 11)]


def test_cli_axes_replace_the_study_grid():
  c = tiny_config()
  with c.unlocked():
    c.grid = ("seeds.init=0,1,2",)
  assert len(grid_lib.expand(c)) == 3
  assert len(grid_lib.expand(c, ["seeds.data=4,5"])) == 2


def test_per_run_fields_share_a_group_and_pad_to_the_maximum():
  c = tiny_config()
  axes = ["data.num_labels=5,8", "data.num_train_classes=10,12", "train.learning_rate=1e-3,1e-4"]
  groups = grid_lib.make_groups(grid_lib.expand(c, axes), grid_lib.grid_fields(c, axes))
  assert len(groups) == 1
  assert groups[0].config.data.num_labels == 8
  assert groups[0].config.data.num_train_classes == 12
  assert sorted({s["data.num_labels"] for s in groups[0].settings}) == [5, 8]


def test_shape_fields_split_groups():
  c = tiny_config()
  axes = ["model.num_heads=2,4", "seeds.init=0,1"]
  groups = grid_lib.make_groups(grid_lib.expand(c, axes), grid_lib.grid_fields(c, axes))
  assert [g.runs for g in groups] == [[0, 1], [2, 3]]
  assert [g.config.model.num_heads for g in groups] == [2, 4]


@pytest.mark.parametrize("axis, field", [
    ("model.bogus=1,2", "model.bogus"),
    ("seeds.init=a,b", "seeds.init"),
    ("seeds.init=", "--grid"),
    ("data.burstiness=1,9", "data.burstiness"),
])
def test_bad_axes(axis, field):
  with pytest.raises(ConfigError) as e:
    grid_lib.expand(tiny_config(), [axis])
  assert e.value.field == field


def test_same_field_twice_is_refused():
  with pytest.raises(ConfigError):
    grid_lib.expand(tiny_config(), ["seeds.init=0,1", "seeds.init=2"])
