"""The layout holds: model < sharding < training < launch (a package imports only from those
below it), and only launch/ parses flags or ends the process. Read from the source (ast), so
imports inside functions count too."""

import ast

import pytest

from conftest import REPO

LAYERS = ("model", "sharding", "training", "launch")
FLAG_PARSERS = ("argparse", "optparse", "getopt", "click", "absl.flags", "absl.app",
                "ml_collections.config_flags")
EXITS = ("sys.exit", "os._exit", "exit", "quit")


def _modules(package: str):
  return sorted((REPO / package).rglob("*.py"))


def _imports(path) -> set[str]:
  """Every module `path` imports (absolute names; `from x import y` gives x and x.y)."""
  names = set()
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      names.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      names.add(node.module)
      names.update(f"{node.module}.{alias.name}" for alias in node.names)
  return names


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
