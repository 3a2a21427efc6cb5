"""`icldyn.bench_profile`: operations land in the right part of a step, and the
per-part times add up to the traced operations' total."""

import collections
import gzip
import json

import pytest

from icldyn import bench_profile
from conftest import tiny_config


@pytest.mark.parametrize("name, op_name, part", [
    ("ynn_fusion.22", "jit(chunk)/vmap(jvp(Transformer))/embed_x/dot_general", "dots"),
    ("dot.19", "", "dots"),
    ("fusion.3", "a/vmap(transpose(jvp(Transformer)))/layer_1/attn/bqhe->bhqk/dot_general", "dots"),
    ("subtract_exponential_fusion.1", "a/vmap(jvp(Transformer))/layer_0/attn/exp",
     "attention elementwise"),
    ("multiply_reduce_fusion", "a/vmap(transpose(jvp(Transformer)))/ln_final/reduce_sum",
     "layer norm"),
    ("multiply_reduce_fusion.2", "a/vmap(jvp(Transformer))/layer_0/ln/reduce_sum", "layer norm"),
    ("bitcast_gather_fusion", "a/vmap(jvp(Transformer))/embed_y/gather", "embedding elementwise"),
    ("multiply_add_fusion.34", "a/cond/branch_1_fun/vmap(optimizer)/add", "optimizer"),
    ("wrapped_multiply.19", "a/cond/branch_1_fun/vmap(norms)/square", "norms"),
    ("slice_bitcast_fusion", "a/vmap(sample)/slice", "sampling"),
    ("xor_xor_fusion", "a/train/vmap(sample)/vmap(jit(_threefry_split))/xor", "sampling"),
    ("copy.818", "", "guard, state copies"),
    ("broadcast_select_fusion", "a/while/body/guard/cond/branch_0_fun/select_n", "guard, state copies"),
    ("transpose_copy_fusion.24", "jit(chunk)/shard_map", "layout transposes"),
    ("wrapped_reduce-window.52", "", "reduce-window"),
    ("wrapped_pad", "a/vmap(jvp())/pad", "other"),
])
def test_categorize(name, op_name, part):
  assert bench_profile.categorize(name, op_name) == part


def test_breakdown_sums_hlo_operations_per_step(tmp_path):
  hlo = "\n".join([
      'ENTRY %main {',
      '  %ynn_fusion.1 = f32[4,8]{1,0} fusion(%p), kind=kCustom, metadata={op_name="x/dot_general"}',
      '  %copy.2 = f32[4,8]{1,0} copy(%ynn_fusion.1)',
      '  %while.3 = (f32[4,8]) while(%t), condition=%c, body=%b',
      '  ROOT %exp_fusion.4 = f32[4,8]{1,0} fusion(%copy.2), kind=kLoop, '
      'metadata={op_name="x/Transformer/layer_0/attn/exp" source_line=3}',
      '}'])
  events = [
      {"ph": "X", "name": "ynn_fusion.1", "dur": 300}, {"ph": "X", "name": "ynn_fusion.1", "dur": 100},
      {"ph": "X", "name": "copy.2", "dur": 50}, {"ph": "X", "name": "while.3", "dur": 9999},
      {"ph": "X", "name": "exp_fusion.4", "dur": 150}, {"ph": "X", "name": "ExecuteHelper", "dur": 7777},
      {"ph": "M", "name": "thread_name", "args": {"name": "t"}},
  ]
  trace = tmp_path / "t.trace.json.gz"
  with gzip.open(trace, "wt") as f:
    json.dump({"traceEvents": events}, f)
  times = bench_profile.op_times(str(trace))
  assert times == collections.Counter({"ynn_fusion.1": 400, "copy.2": 50, "while.3": 9999,
                                       "exp_fusion.4": 150, "ExecuteHelper": 7777})
  ops = bench_profile.hlo_ops(hlo)
  assert ops["exp_fusion.4"] == ("fusion", "f32[4,8]{1,0}", "x/Transformer/layer_0/attn/exp")
  parts, rows = bench_profile.breakdown(times, ops, steps=2)
  # Control flow and non-HLO events are left out; the rest is us / steps / 1000.
  assert parts["dots"] == pytest.approx(0.2)
  assert parts["guard, state copies"] == pytest.approx(0.025)
  assert parts["attention elementwise"] == pytest.approx(0.075)
  assert sum(parts.values()) == pytest.approx(0.3)
  assert [r[1] for r in rows] == ["ynn_fusion.1", "exp_fusion.4", "copy.2"]


@pytest.mark.slow  # compiles and profiles a real chunk: about a minute
def test_profile_of_a_real_chunk_finds_every_main_part():
  cfg = tiny_config(grid=("seeds.init=0,1",))
  r = bench_profile.profile_chunk(cfg, steps=3)
  assert r["runs"] == 2 and r["steps"] == 3 and r["wall_ms_per_step"] > 0
  assert sum(r["parts"].values()) == pytest.approx(sum(row[0] for row in r["rows"]))
  # The model's modules and train.candidate_step's named scopes reach the
  # compiled operations' metadata, so each main part has operations.
  for part in ("dots", "attention elementwise", "layer norm", "optimizer", "norms", "sampling"):
    assert r["parts"][part] > 0, (part, r["parts"])
