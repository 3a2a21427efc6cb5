"""Config loading, overrides and validation; the CLI's handling of bad input."""

import os

import pytest

from icldyn import cli
from icldyn import config as config_lib
from icldyn.config import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STUDY = os.path.join(ROOT, "experiments", "ih_paper.py")


def test_base_config_is_the_paper_run_and_valid():
  c = config_lib.load_config(STUDY)
  config_lib.validate(c)
  assert (c.model.num_layers, c.model.num_heads, c.model.d_model) == (2, 8, 64)
  assert c.model.pos_embedding == "rope" and c.model.layer_norm and c.model.mlp_ratio is None
  assert (c.train.learning_rate, c.train.batch_size, c.train.num_sequences) == (1e-5, 32, 1_000_000)
  assert (c.data.num_train_classes, c.data.num_test_classes, c.data.num_labels) == (50, 100, 5)
  assert config_lib.eval_names(c) == ["fsl_train", "fsl_val_rl", "fsl_train_valex", "fsl_test_class"]


def test_overrides_are_typed():
  c = config_lib.load_config(STUDY)
  config_lib.apply_overrides(c, ["model.num_heads=4", "train.learning_rate=3e-4",
                                 "model.layer_norm=false", "model.mlp_ratio=4"])
  assert c.model.num_heads == 4 and isinstance(c.model.num_heads, int)
  assert c.train.learning_rate == 3e-4
  assert c.model.layer_norm is False
  assert c.model.mlp_ratio == 4.0


@pytest.mark.parametrize("override, field", [
    ("model.nope=1", "model.nope"),
    ("model.num_heads=four", "model.num_heads"),
    ("train.learning_rate=fast", "train.learning_rate"),
])
def test_bad_overrides_name_the_field(override, field):
  c = config_lib.load_config(STUDY)
  with pytest.raises(ConfigError) as e:
    config_lib.apply_overrides(c, [override])
  assert e.value.field == field


@pytest.mark.parametrize("override, field", [
    ("data.burstiness=3", "data.burstiness"),
    ("data.num_labels=60", "data.num_labels"),
    ("model.pos_embedding=alibi", "model.pos_embedding"),
    ("model.d_model=60", "model.d_model"),
    ("train.optimizer=lion", "train.optimizer"),
    ("data.zipf_alpha=-1.0", "data.zipf_alpha"),
    ("data.source=file", "data.path"),
])
def test_validation_names_the_field(override, field):
  c = config_lib.load_config(STUDY)
  config_lib.apply_overrides(c, [override])
  with pytest.raises(ConfigError) as e:
    config_lib.validate(c)
  assert e.value.field == field


@pytest.mark.parametrize("args", [
    ["--config.data.burstiness=5"],
    ["--config.data.num_labels=100"],
    ["--config.model.what=1"],
    ["--grid", "model.nonexistent=1,2"],
    ["--grid", "data.num_labels=5,500"],
])
def test_cli_bad_input_exit_2_and_writes_nothing(tmp_path, capsys, args):
  workdir = tmp_path / "wd"
  code = cli.main(["train", "--config", STUDY, "--workdir", str(workdir)] + args)
  assert code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("icldyn: error: ")
  assert not workdir.exists()
