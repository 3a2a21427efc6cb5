"""A user's own clamp and measure, as a module the API tests import by name
(`api_parts.prev_token_by_hand`, `api_parts:query_label_attention`)."""

import jax.numpy as jnp

from icldyn.model import Clamp


def prev_token_by_hand(ctx, layer=0, head=0):
  """Head `head` of `layer` attends to the previous token (position 0 to itself):
  what the catalogue's prev_token(layer, heads=[head]) does, written from scratch."""
  t = ctx.spec.seq_len
  pattern = jnp.eye(t, k=-1).at[0, 0].set(1.0)  # [T, T]
  mask = jnp.zeros((1, ctx.spec.num_heads, 1, 1), bool).at[0, head].set(True)
  return {f"layer_{layer}/attn/pattern": Clamp(pattern[None, None], mask)}


def query_label_attention(params, cache, batch):
  """Few-shot: the last layer's attention from the query to the label tokens
  after exemplars of its class, minus that to the other label tokens, per
  head ([L, H]: zero in the first layer)."""
  pattern = cache["layer_1/attn/pattern"][:, :, -1, 1:-1:2]  # [B, H, C]
  same = (batch.classes[:, :-1] == batch.classes[:, -1:])[:, None, :]  # [B, 1, C]
  score = jnp.mean(jnp.sum(jnp.where(same, pattern, -pattern), axis=-1), axis=0)  # [H]
  return {"query_label_attention": jnp.stack([jnp.zeros_like(score), score])}
