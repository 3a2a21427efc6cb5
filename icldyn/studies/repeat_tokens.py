"""Induction heads on repeated token sequences (Olsson et al. 2022; Elhage et al. 2021).

Command:
    icldyn train --config repeat_tokens[:cpu|:smoke] --workdir runs/repeat_tokens

What it runs: a 2-layer attention-only transformer (RoPE, LayerNorm)
predicting the next token of 64-token sequences (BOS + 63) in which a random
segment appears four times, at random non-overlapping places
(`task.name=repeat_tokens`, icldyn/tasks/repeat_tokens.py; the copies'
offsets vary over tens of positions, so no fixed-offset head can predict
them and only an induction head can), Adam at lr 3e-3, batch 32. One grid,
one compiled program: seeds x vocabulary size x segment length, and the
first layer's head 0 clamped to a perfect previous-token pattern
(`clamp.condition=prev_token`) against no clamp. `cpu`: 4 heads, d_model 32,
2 seeds x V in {32, 64} x segment in {10, 14} x 2 conditions (16 runs),
9.6e4 sequences each; the full variant: 8 heads, d_model 64, 4 seeds, 3e5
sequences; `smoke`: seconds.

What to look for: the loss on repeated tokens (`tok_train/loss_repeated`)
sits near ln V and then falls abruptly; at the same time a first-layer head
becomes a previous-token head (`prev_token.h*`) and a last-layer head an
induction head (`prefix_matching.h*`).
"""

from icldyn.config import base_config
from icldyn.errors import did_you_mean

GRID = ("tokens.vocab_size=32,64", "tokens.segment_len=10,14", "clamp.condition=none,prev_token")


# Variant -> one line (`icldyn list`).
VARIANTS = {
    '': '8 heads, d_model 64, 4 seeds x vocabulary x segment x clamp, 3e5 sequences',
    'cpu': '16 runs: seeds x vocabulary x segment length (13 min on 2 cores)',
    'smoke': 'seconds',
}


def get_config(arg: str = ""):
  c = base_config()
  with c.unlocked():
    c.task.name = "repeat_tokens"
    c.model.mlp_ratio = None
    c.train.learning_rate = 3e-3
    c.train.batch_size = 32
    c.eval.size = 512
    c.eval.batch = 256
    if arg == "smoke":
      c.model.num_heads = 4
      c.model.d_model = 32
      c.tokens.seq_len = 32
      c.tokens.vocab_size = 16
      c.tokens.segment_len = 5
      c.train.num_sequences = 1600
      c.train.eval_every = 800
      c.eval.size = 32
      c.eval.batch = 32
      c.checkpoint.every = 800
      c.checkpoint.resume_every = 800
      c.grid = ("seeds.init=0,1",)
    elif arg == "cpu":
      c.model.num_heads = 4
      c.model.d_model = 32
      c.train.num_sequences = 96_000
      c.train.eval_every = 3_200
      c.eval.size = 256
      c.checkpoint.every = 8_000
      c.checkpoint.log_num = 8
      c.checkpoint.resume_every = 32_000
      c.grid = ("seeds.init=0,1",) + GRID
    elif arg == "":
      c.train.num_sequences = 300_000
      c.train.eval_every = 5_000
      c.checkpoint.every = 25_000
      c.checkpoint.log_num = 20
      c.grid = ("seeds.init=0,1,2,3",) + GRID
    else:
      raise ValueError(f"unknown variant {arg!r}{did_you_mean(arg, ('cpu', 'smoke'))} "
                       "(use '', 'cpu' or 'smoke')")
  return c
