"""The layout rules of docs/architecture.md, checked on the source.

The table in docs/architecture.md ("may import") is the rule: this test reads
it, walks the AST of every module of `icldyn/` and fails on an icldyn import
the table does not allow, on an icldyn import inside a function outside the
entry points, on a cycle in the table itself, and on a private name of one
icldyn module used in another module (or in a test).
"""

import ast
import os
import re

from conftest import ROOT

PACKAGE = os.path.join(ROOT, "icldyn")
ENTRY_POINTS = {"cli", "bench", "bench_profile", "bench_analysis", "gpu_check"}


def rules() -> dict[str, set[str]]:
  """{unit: units it may import} from docs/architecture.md's module table."""
  text = open(os.path.join(ROOT, "docs", "architecture.md")).read()
  out = {}
  for line in text.splitlines():
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    m = re.fullmatch(r"`(\w+)`", cells[0]) if len(cells) == 3 else None
    if m:
      out[m.group(1)] = set(re.findall(r"`(\w+)`", cells[2]))
  return out


def unit(module: str) -> str:
  """The table row of a dotted module name (a package's modules share its row)."""
  parts = module.split(".")
  return parts[1] if len(parts) > 1 else "__init__"


def modules() -> dict[str, str]:
  """{dotted module name: path} of every module of the package."""
  out = {}
  for root, _, names in os.walk(PACKAGE):
    for n in names:
      if n.endswith(".py"):
        rel = os.path.relpath(os.path.join(root, n), ROOT)[:-3].replace(os.sep, ".")
        out[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = os.path.join(root, n)
  return out


def icldyn_imports(tree: ast.AST):
  """(imported module, line, inside a function) of every icldyn import of a module."""
  func_lines = set()
  for node in ast.walk(tree):
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
      func_lines.update(range(node.lineno, (node.end_lineno or node.lineno) + 1))
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module:
      names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    else:
      continue
    for name in names:
      if name.split(".")[0] == "icldyn" and name != "icldyn":
        yield name, node.lineno, node.lineno in func_lines


def test_the_table_covers_every_module_and_has_no_cycle():
  table = rules()
  units = {unit(m) for m in modules()}
  assert units <= set(table), f"modules missing from docs/architecture.md: {units - set(table)}"
  for u, allowed in table.items():
    assert allowed <= set(table), f"{u} lists unknown modules {allowed - set(table)}"
  # Depth-first search for a cycle among the allowed imports.
  state: dict[str, int] = {}

  def visit(u, path):
    state[u] = 1
    for v in table[u]:
      assert state.get(v) != 1, f"import cycle in the table: {' -> '.join(path + [u, v])}"
      if v not in state:
        visit(v, path + [u])
    state[u] = 2

  for u in table:
    if u not in state:
      visit(u, [])


def test_imports_follow_the_table():
  table = rules()
  known = {unit(m) for m in modules()}
  bad = []
  for mod, path in sorted(modules().items()):
    src = unit(mod)
    for name, line, in_function in icldyn_imports(ast.parse(open(path).read())):
      dst = unit(name)
      if dst not in known:  # `from icldyn.x import name`: the module part decides
        continue
      if dst != src and dst not in table[src]:
        bad.append(f"{path}:{line}: {src} imports {dst} (allowed: {sorted(table[src])})")
      if in_function and src not in ENTRY_POINTS:
        bad.append(f"{path}:{line}: import of {name} inside a function")
  assert not bad, "\n".join(bad)


def _aliases(tree: ast.AST) -> dict[str, str]:
  """{local name: icldyn module} bound by a module's imports."""
  out = {}
  mods = set(modules())
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for a in node.names:
        if a.name.startswith("icldyn"):
          out[a.asname or a.name.split(".")[0]] = a.name
    elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("icldyn"):
      for a in node.names:
        full = f"{node.module}.{a.name}"
        if full in mods:
          out[a.asname or a.name] = full
  return out


def test_no_private_name_crosses_a_module():
  files = list(modules().items())
  tests = os.path.join(ROOT, "tests")
  files += [(f"tests.{n[:-3]}", os.path.join(tests, n)) for n in os.listdir(tests)
            if n.endswith(".py")]
  bad = []
  for mod, path in files:
    tree = ast.parse(open(path).read())
    aliases = _aliases(tree)
    for node in ast.walk(tree):
      if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("icldyn"):
        for a in node.names:
          if a.name.startswith("_") and not a.name.startswith("__"):
            bad.append(f"{path}:{node.lineno}: imports {node.module}.{a.name}")
      if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
          and node.value.id in aliases and aliases[node.value.id] != mod
          and node.attr.startswith("_") and not node.attr.startswith("__")):
        bad.append(f"{path}:{node.lineno}: {aliases[node.value.id]}.{node.attr}")
  assert not bad, "\n".join(bad)
