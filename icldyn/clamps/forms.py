"""The config forms of clamps: `clamps`, `clamp.keep_head`, `clamp.condition`,
`clamp.strength` and the named clamps of `eval.clamps`.

`parse` and `render` turn the text form (`ablate(layer=1, heads=[0, 2]) +
prev_token(layer=0)`) into constructors and back; `CONDITIONS` are the
paper's sub-circuit conditions (Fig. 5b); `named_plan` gives the plans of
evaluation under named clamps; `run_clamps` and `plans_for_group` turn a
run's (a group's) settings into resolved clamps and plans, given the model
(`icldyn.build` makes the model from the config).
"""

from __future__ import annotations

import ast
import dataclasses
import re
from typing import Callable, Sequence

from icldyn.clamps.catalogue import (BY_NAME, AblateHeads, ClampSpec, CopyFromHead,
                                     InductionPattern, Layer1Clamp, Preserve,
                                     PrevTokenPattern)
from icldyn.clamps.custom import CustomClamp, custom_clamp, import_function
from icldyn.clamps.plan import Plan, build_resolved, check_conflicts, fixed_plan, resolve
from icldyn.errors import ConfigError, did_you_mean


def parse(text: str, field: str = "clamps") -> tuple[ClampSpec, ...]:
  """Parses the config form of a list of clamps.

  The form is constructor calls with keyword arguments joined by '+', e.g.
  `ablate(layer=1, heads=[0, 2]) + prev_token(layer=0, heads=[2], strength=0.9)`.
  Values are Python literals; lists are written [a, b]; true/false/none and
  bare names (site=z, what=[pattern, v]) are accepted too. A dotted name
  (`mymodule.my_clamp(layer=0)`) is a custom clamp (`icldyn.clamps.custom`).

  Raises:
    ConfigError(field, ...): on anything else.
  """
  text = (text or "").strip()
  if not text:
    return ()
  example = "e.g. ablate(layer=1, heads=[0, 2]) + prev_token(layer=0, heads=[1])"
  try:
    node = ast.parse(text, mode="eval").body
  except SyntaxError as e:
    raise ConfigError(field, f"cannot parse {text!r}: expected clamp calls joined by '+', "
                      f"{example}") from e
  calls = []

  def flatten(n):
    if isinstance(n, ast.BinOp) and isinstance(n.op, ast.Add):
      flatten(n.left)
      flatten(n.right)
    else:
      calls.append(n)

  flatten(node)
  out = []
  for call in calls:
    src = ast.get_source_segment(text, call) or ast.dump(call)
    if not isinstance(call, ast.Call) or not isinstance(call.func, (ast.Name, ast.Attribute)):
      raise ConfigError(field, f"{src!r} is not a clamp call; {example}")
    if isinstance(call.func, ast.Attribute):  # module.function: a custom clamp
      out.append(_custom(call, src, field))
      continue
    name = call.func.id
    cls = BY_NAME.get(name)
    if cls is None:
      raise ConfigError(field, f"unknown clamp {name!r}{did_you_mean(name, BY_NAME)}; "
                        f"known: {', '.join(BY_NAME)}")
    if call.args:
      raise ConfigError(field, f"{src}: use keyword arguments, {example}")
    allowed = {f.name for f in dataclasses.fields(cls) if f.repr}
    kwargs = {}
    for kw in call.keywords:
      if kw.arg not in allowed:
        raise ConfigError(field, f"{name}: unknown argument {kw.arg!r}; "
                          f"allowed: {', '.join(sorted(allowed))}")
      try:
        kwargs[kw.arg] = _literal(kw.value)
      except ValueError as e:
        raise ConfigError(field, f"{name}: bad value for {kw.arg}: {e}") from e
    try:
      out.append(cls(**kwargs))
    except TypeError as e:
      missing = [f.name for f in dataclasses.fields(cls) if f.repr and f.name not in kwargs
                 and f.default is dataclasses.MISSING]
      raise ConfigError(field, f"{name}: missing argument(s) {missing}") from e
    except ValueError as e:
      raise ConfigError(field, f"{name}: {e}") from e
  return tuple(out)


def _custom(call: ast.Call, src: str, field: str) -> CustomClamp:
  """`module.function(k=v, ...)` as a CustomClamp (the function must import)."""
  path = ast.unparse(call.func)
  if call.args:
    raise ConfigError(field, f"{src}: use keyword arguments")
  kwargs = {}
  for kw in call.keywords:
    try:
      kwargs[kw.arg] = _literal(kw.value)
    except ValueError as e:
      raise ConfigError(field, f"{path}: bad value for {kw.arg}: {e}") from e
  try:
    import_function(path)
  except ValueError as e:
    raise ConfigError(field, str(e)) from e
  return custom_clamp(path, **kwargs)


def _literal(node):
  if isinstance(node, ast.Name):
    return {"true": True, "false": False, "none": None}.get(node.id.lower(), node.id)
  if isinstance(node, (ast.List, ast.Tuple)):
    return [_literal(e) for e in node.elts]
  if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
    v = _literal(node.operand)
    if isinstance(v, (int, float)) and not isinstance(v, bool):
      return -v
  if isinstance(node, ast.Constant) and (node.value is None or
                                         isinstance(node.value, (int, float, str, bool))):
    return node.value
  raise ValueError(f"{ast.dump(node)} is not a literal (numbers, strings, lists, true/false)")


def render(clamps: Sequence[ClampSpec]) -> str:
  """The config form of a list of clamps ('' for none); `parse(render(x))` gives x."""
  return " + ".join(c.render() for c in clamps)


CONDITIONS = ("none", "prev_token", "layer1", "match", "copy", "layer1_copy")
"""The paper's sub-circuit conditions (Fig. 5b), `clamp.condition`:

  none         nothing beyond `clamp.keep_head`.
  prev_token   first layer, head 0: fixed previous-token pattern of strength
               `clamp.strength` (the paper fixed one first-layer head).
  layer1       `Layer1Clamp`: the first layer is a perfect previous-token
               layer and adds nothing else, so only the second layer learns.
  match        the kept last-layer head's induction rows get the perfect
               induction (match) pattern of strength `clamp.strength`
               (`InductionPattern`, as the paper's code): only its copy
               (OV) path and the rest learn.
  copy         `CopyFromHead` on the kept head: the logits are its scores, so
               only the match (QK) path, and the first layer, learn.
  layer1_copy  layer1 + copy: only the second layer's QK match learns.
match, copy and layer1_copy need `clamp.keep_head` >= 0; layer1 and
layer1_copy need a 2-layer model and a task with a layer-1 clamp.
"""


def keep_head_clamps(spec, keep_head: int) -> tuple[ClampSpec, ...]:
  """`clamp.keep_head`: ablate the values of every last-layer head but `keep_head`."""
  if keep_head < 0:
    return ()
  others = tuple(h for h in range(spec.num_heads) if h != keep_head)
  return (AblateHeads(layer=spec.num_layers - 1, heads=others),) if others else ()


def condition_clamps(spec, condition: str, keep_head: int, strength: float) -> tuple[ClampSpec, ...]:
  """The clamps of a sub-circuit condition (see CONDITIONS)."""
  last = spec.num_layers - 1
  if condition == "none":
    return ()
  if condition == "prev_token":
    return (PrevTokenPattern(layer=0, heads=(0,), strength=strength),)
  layer1 = (Layer1Clamp(),) if condition.startswith("layer1") else ()
  copy = (CopyFromHead(head=keep_head, layer=last),) if condition.endswith("copy") else ()
  if condition == "match":
    return (InductionPattern(layer=last, heads=(keep_head,), strength=strength),)
  return layer1 + copy


def run_clamps(cfg, settings: dict, spec, load_donor: Callable | None = None
               ) -> tuple[tuple[ClampSpec, ...], list[str]]:
  """One run's resolved clamps and the config field each came from.

  Args:
    cfg: the run's (or group's) config.
    settings: the run's flat settings; fields absent there come from `cfg`.
    spec: the ModelSpec.
    load_donor: loads graft donors (`plan.resolve`); None only checks them.
  """
  get = lambda f, default: settings.get(f, default)
  keep = get("clamp.keep_head", cfg.clamp.keep_head)
  cond = get("clamp.condition", cfg.clamp.condition)
  strength = get("clamp.strength", cfg.clamp.strength)
  if isinstance(keep, bool) or not isinstance(keep, int) or not -1 <= keep < spec.num_heads:
    raise ConfigError("clamp.keep_head", f"must be -1 (off) or a last-layer head in "
                      f"[0, {spec.num_heads}), got {keep!r}")
  if cond not in CONDITIONS:
    raise ConfigError("clamp.condition", f"must be one of {CONDITIONS}, got {cond!r}")
  if not isinstance(strength, (int, float)) or not 0.0 <= strength <= 1.0:
    raise ConfigError("clamp.strength", f"must be in [0, 1], got {strength!r}")
  if cond in ("match", "copy", "layer1_copy") and keep < 0:
    raise ConfigError("clamp.condition", f"condition {cond!r} acts on the one active "
                      "last-layer head: set clamp.keep_head >= 0")
  if cond.startswith("layer1") and spec.num_layers != 2:
    raise ConfigError("clamp.condition", f"condition {cond!r} is the paper's 2-layer "
                      f"circuit (model.num_layers={spec.num_layers})")
  parts = [(c, "clamps") for c in resolve(spec, parse(get("clamps", cfg.clamps), "clamps"),
                                          "clamps", load_donor)]
  parts += [(c, "clamp.keep_head") for c in resolve(spec, keep_head_clamps(spec, keep),
                                                    "clamp.keep_head", load_donor)]
  parts += [(c, "clamp.condition") for c in resolve(spec, condition_clamps(spec, cond, keep,
                                                                           float(strength)),
                                                    "clamp.condition", load_donor)]
  clamps, fields = tuple(c for c, _ in parts), [f for _, f in parts]
  check_conflicts(spec, clamps, fields)
  return clamps, fields


def eval_clamp_names(cfg) -> list[str]:
  """The names in `eval.clamps`, in order."""
  names = [n.strip() for n in str(cfg.eval.clamps).split(",") if n.strip()]
  dup = [n for i, n in enumerate(names) if n in names[:i]]
  if dup:
    raise ConfigError("eval.clamps", f"{dup[0]!r} is listed twice")
  return names


def plans_for_group(cfg, settings: list[dict], spec, load_donor: Callable | None = None):
  """The training plan, per-run clamp params and named evaluation plans of a group.

  Args:
    cfg: the group's config.
    settings: per-run flat settings (with 'clamp.*' fields, and 'clamps' when
      it is a grid field).
    spec: the group's ModelSpec.
    load_donor: loads graft donors given by workdir.

  Returns:
    (plan or None, stacked per-run params or None, tuple of (name, plan)).
  """
  eval_plans = tuple((n, named_plan(n, spec)) for n in eval_clamp_names(cfg))
  runs = [run_clamps(cfg, s, spec, load_donor)[0] for s in settings]
  plan, params = build_resolved(spec, runs)
  return plan, params, eval_plans


def validate(cfg, spec) -> None:
  """Checks one run's clamp fields (`clamps`, `clamp.*`, `eval.clamps`) against
  its model without loading graft donors; raises ConfigError naming the field."""
  run_clamps(cfg, {}, spec)
  for n in eval_clamp_names(cfg):
    named_plan(n, spec)


_NAMED = (
    (r"unclamped", "no clamp (a run trained with clamps, evaluated without)"),
    (r"keep_head_(\d+)", "only last-layer head h kept (the others' values ablated)"),
    (r"ablate_head_(\d+)_(\d+)", "head h of layer l ablated"),
    (r"ablate_layer_(\d+)", "every head of layer l ablated"),
    (r"preserve_pattern_ablate_v_(\d+)",
     "layer l's values ablated, every layer's patterns preserved from an unclamped pass"),
)


def named_clamps(name: str, spec) -> tuple[ClampSpec, ...]:
  """The clamps of a named evaluation clamp (see `named_plan`)."""
  for pattern, _ in _NAMED:
    m = re.fullmatch(pattern, name)
    if not m:
      continue
    n = [int(g) for g in m.groups()]
    if pattern.startswith("keep_head"):
      if not 0 <= n[0] < spec.num_heads:
        raise ConfigError("eval.clamps", f"{name}: head {n[0]} out of range "
                          f"(model.num_heads={spec.num_heads})")
      return keep_head_clamps(spec, n[0])
    if pattern.startswith("ablate_head"):
      return (AblateHeads(layer=n[0], heads=(n[1],)),)
    if pattern.startswith("ablate_layer"):
      return (AblateHeads(layer=n[0]),)
    if pattern.startswith("preserve"):
      return (Preserve(what=("pattern",)), AblateHeads(layer=n[0]))
    return ()
  hint = did_you_mean(name, named_clamp_names(spec))
  if hint:
    raise ConfigError("eval.clamps", f"unknown named clamp {name!r}{hint}")
  known = "; ".join(p.replace(r"(\d+)", "N") + f": {d}" for p, d in _NAMED)
  raise ConfigError("eval.clamps", f"unknown named clamp {name!r}; known: {known}")


def named_clamp_names(spec) -> list[str]:
  """Every named clamp a model has (for suggestions)."""
  layers, heads = range(spec.num_layers), range(spec.num_heads)
  return (["unclamped"] + [f"keep_head_{h}" for h in heads]
          + [f"ablate_head_{l}_{h}" for l in layers for h in heads]
          + [f"ablate_layer_{l}" for l in layers]
          + [f"preserve_pattern_ablate_v_{l}" for l in layers])


def named_plan(name: str, spec) -> Plan:
  """A plan with constant clamps by name, for `eval.clamps` and checkpoint analysis.

  Names: `unclamped`, `keep_head_{h}` (only last-layer head h kept),
  `ablate_head_{l}_{h}`, `ablate_layer_{l}`, `preserve_pattern_ablate_v_{l}`
  (layer l's values ablated, patterns of every layer preserved from an
  unclamped first pass). The plan ignores the run's training clamps:
  `plan.forward(spec, params, batch, num_outputs, None)`.

  Raises:
    ConfigError('eval.clamps', ...): unknown name or out-of-range index.
  """
  return fixed_plan(spec, named_clamps(name, spec), "eval.clamps")


def describe(settings: dict) -> dict:
  """Readable clamp columns of one run for runs.csv:
  {'clamps': 'keep_head(3)+condition(match,s=1.0)+<the clamps field>'} or 'none'."""
  parts = []
  if settings.get("clamp.keep_head", -1) >= 0:
    parts.append(f"keep_head({settings['clamp.keep_head']})")
  cond = settings.get("clamp.condition", "none")
  if cond in ("prev_token", "match"):
    parts.append(f"condition({cond},s={float(settings.get('clamp.strength', 1.0))!r})")
  elif cond != "none":
    parts.append(f"condition({cond})")
  text = settings.get("clamps") or ""
  if text:
    try:
      parts.append(render(parse(text)))
    except ConfigError:
      parts.append(text)
  return {"clamps": "+".join(parts) or "none"}
