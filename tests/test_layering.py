"""The layout holds: model < sharding < training < launch (a package imports only from those
below it), no package has an import cycle inside it, and only launch/ parses flags or ends the
process. Read from the source (ast), so imports inside functions count too."""

import ast

import pytest

from conftest import REPO

LAYERS = ("model", "sharding", "training", "launch")
FLAG_PARSERS = ("argparse", "optparse", "getopt", "click", "absl.flags", "absl.app",
                "ml_collections.config_flags")
EXITS = ("sys.exit", "os._exit", "exit", "quit")


def _modules(package: str):
  return sorted((REPO / package).rglob("*.py"))


def _imports(path, root=REPO) -> set[str]:
  """Every module `path` imports (absolute names; `from x import y` gives x and x.y; relative
  imports are resolved against `path`'s package under `root`)."""
  names = set()
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      names.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      module = node.module or ""
      if node.level:
        package = _module_name(path, root).split(".")
        package = package[:len(package) - node.level + (path.name == "__init__.py")]
        module = ".".join(package + ([module] if module else []))
      if module:
        names.add(module)
        names.update(f"{module}.{alias.name}" for alias in node.names)
  return names


def _module_name(path, root=REPO) -> str:
  """model/hf/gpt2.py -> "model.hf.gpt2"; model/hf/__init__.py -> "model.hf"."""
  parts = path.relative_to(root).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(package: str, root=REPO) -> dict[str, set[str]]:
  """module -> the modules of the same package it imports: `import a.b` imports a.b, `from a
  import b` imports a.b where that is a module, else a; importing a module also runs the
  `__init__.py` of every package above it (a.b imports a), except the importer's own packages,
  which Python has already started before it."""
  modules = {_module_name(p, root): p for p in sorted((root / package).rglob("*.py"))}
  graph = {}
  for name, path in modules.items():
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
      if isinstance(node, ast.Import):
        wanted = [alias.name for alias in node.names]
      elif isinstance(node, ast.ImportFrom):
        module = node.module or ""
        if node.level:
          base = name.split(".")
          base = base[:len(base) - node.level + (path.name == "__init__.py")]
          module = ".".join(base + ([module] if module else []))
        wanted = [f"{module}.{a.name}" if f"{module}.{a.name}" in modules else module
                  for a in node.names]
      else:
        continue
      for w in wanted:
        parts = w.split(".")
        targets.update(m for m in (".".join(parts[:i]) for i in range(1, len(parts) + 1))
                       if m in modules and m != name and not _within(name, m))
    graph[name] = targets
  return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One import cycle of `graph` as [a, b, ..., a], or None."""
  state, stack = {}, []

  def visit(node):
    state[node] = "open"
    stack.append(node)
    for nxt in sorted(graph.get(node, ())):
      if state.get(nxt) == "open":
        return stack[stack.index(nxt):] + [nxt]
      if nxt not in state and (found := visit(nxt)):
        return found
    state[node] = "done"
    stack.pop()
    return None

  for node in sorted(graph):
    if node not in state and (found := visit(node)):
      return found
  return None


def _calls(path) -> set[str]:
  """Dotted names of everything `path` calls or raises (sys.exit, SystemExit, ...)."""
  out = set()
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    target = node.func if isinstance(node, ast.Call) else (
        node.exc if isinstance(node, ast.Raise) else None)
    if isinstance(target, ast.Call):
      target = target.func
    parts = []
    while isinstance(target, ast.Attribute):
      parts.append(target.attr)
      target = target.value
    if isinstance(target, ast.Name):
      out.add(".".join([target.id, *reversed(parts)]))
  return out


def _within(name: str, package: str) -> bool:
  return name == package or name.startswith(package + ".")


@pytest.mark.parametrize("package", LAYERS[:-1])
def test_a_package_imports_nothing_from_the_layers_above_it(package):
  above = LAYERS[LAYERS.index(package) + 1:]
  bad = [f"{path.relative_to(REPO)} imports {name}" for path in _modules(package)
         for name in sorted(_imports(path)) if any(_within(name, up) for up in above)]
  assert not bad, bad


@pytest.mark.parametrize("package", [*LAYERS, "configs"])
def test_no_import_cycle_inside_a_package(package):
  cycle = find_cycle(import_graph(package))
  assert cycle is None, " -> ".join(cycle)


def test_the_cycle_check_finds_cycles(tmp_path):
  """A cycle through a function-level import, a relative import and a package's __init__ is
  found; the same package without it is not; a cycle through the __init__.py that importing a
  subpackage's module runs first is found."""
  pkg = tmp_path / "pkg"
  (pkg / "sub").mkdir(parents=True)
  (pkg / "__init__.py").write_text("")
  (pkg / "sub" / "__init__.py").write_text("from pkg.sub import b\n")
  (pkg / "a.py").write_text("import os\nfrom pkg import sub\n")
  (pkg / "sub" / "b.py").write_text("def f():\n  from .. import a\n")
  graph = import_graph("pkg", tmp_path)
  assert graph == {"pkg": set(), "pkg.a": {"pkg.sub"}, "pkg.sub": {"pkg.sub.b"},
                   "pkg.sub.b": {"pkg.a"}}
  assert find_cycle(graph) == ["pkg.a", "pkg.sub", "pkg.sub.b", "pkg.a"]
  (pkg / "sub" / "b.py").write_text("import pkg.c\n")
  (pkg / "c.py").write_text("")
  assert find_cycle(import_graph("pkg", tmp_path)) is None
  # pkg.c imports only pkg.sub.b, but that runs pkg/sub/__init__.py, which imports pkg.c.
  (pkg / "sub" / "__init__.py").write_text("from pkg.c import f\n")
  (pkg / "sub" / "b.py").write_text("")
  (pkg / "c.py").write_text("from pkg.sub.b import g\n\ndef f():\n  pass\n")
  graph = import_graph("pkg", tmp_path)
  assert graph["pkg.c"] == {"pkg.sub", "pkg.sub.b"} and graph["pkg.sub.b"] == set()
  assert find_cycle(graph) == ["pkg.sub", "pkg.c", "pkg.sub"]


@pytest.mark.parametrize("package", ["model", "sharding", "training", "configs"])
def test_only_launch_parses_flags_or_exits(package):
  bad = []
  for path in _modules(package):
    bad += [f"{path.relative_to(REPO)} imports {name}" for name in sorted(_imports(path))
            if any(_within(name, parser) for parser in FLAG_PARSERS)]
    bad += [f"{path.relative_to(REPO)} calls {name}" for name in sorted(_calls(path))
            if name in EXITS or name == "SystemExit"]
  assert not bad, bad


def test_the_checks_see_what_they_look_for():
  """launch/ does parse flags and exit, so the two scans above can fail."""
  cli = REPO / "launch" / "cli.py"
  assert "absl.flags" in _imports(cli) and "sys.exit" in _calls(cli)
  assert any(_within(name, "training") for name in _imports(REPO / "launch" / "train.py"))
