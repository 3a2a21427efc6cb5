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


@pytest.mark.parametrize("argv, message", [
    (["--config.train.learing_rate=1e-4"], "train.learing_rate: unknown config field; did you mean "
                                           "train.learning_rate?"),
    (["--grid", "data.num_lables=5,6"], "data.num_lables: unknown config field; did you mean "
                                        "data.num_labels?"),
    (["--config.eval.clamps=keep_head3"], "eval.clamps: unknown named clamp 'keep_head3'; did you "
                                          "mean keep_head_3?"),
    (["--config.eval.evaluators=fsl_trian"], "eval.evaluators: unknown evaluator 'fsl_trian' of "
                                             "task fewshot; did you mean fsl_train? (known: "
                                             "fsl_train, fsl_val_rl, fsl_train_valex, "
                                             "fsl_test_class)"),
    (["--config.task.name=repeat_token"], "task.name: unknown task 'repeat_token'; did you mean "
                                          "repeat_tokens? (known: fewshot, repeat_tokens)"),
])
def test_misspelt_names_get_the_closest_valid_one(argv, message, tmp_path, capsys):
  code = cli.main(["train", "--config", STUDY + ":smoke", "--workdir", str(tmp_path / "w")] + argv)
  err = capsys.readouterr().err.strip()
  assert code == 2 and err == f"icldyn: error: {message}", err
  assert not (tmp_path / "w").exists()


def test_a_misspelt_study_variant_gets_the_closest_one(tmp_path, capsys):
  code = cli.main(["train", "--config", STUDY + ":smok", "--workdir", str(tmp_path / "w")])
  assert code == 2 and "unknown variant 'smok'; did you mean smoke?" in capsys.readouterr().err


@pytest.mark.parametrize("argv, wanted", [
    (["train", "--help"], ["--config.FIELD=VALUE", "--workdir DIR", "output directory",
                           "train.learning_rate = 1e-05", "tokens.vocab_size = 64",
                           "task.name = 'fewshot'"]),
    (["analyze", "--help"], ["ov_copying", "k_composition_svd_share",
                             "EVALUATOR/METRIC[:up|down[:LEVEL[:CLIP]]]", "progress/MEASURE"]),
    (["paper", "--help"], ["--variant {cpu,smoke}", "paper's settings"]),
])
def test_help_is_where_a_user_learns_the_command(argv, wanted, capsys):
  with pytest.raises(SystemExit) as e:
    cli.main(argv)
  assert e.value.code == 0
  out = capsys.readouterr().out
  for w in wanted:
    assert w in out, (w, out[-2000:])
  assert "{,cpu" not in out
