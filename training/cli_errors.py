"""One-sentence explanations of command-line mistakes for entry points that take an
ml_collections config file (`--config path[:variant]`) and `--config.<key>=value` overrides.

absl and ml_collections report these as tracebacks or multi-line messages; `explain_flag_error`
turns them into a sentence naming the bad flag or key (with a "did you mean" for a misspelt key).
"""

from __future__ import annotations

import difflib
import importlib.util
import os
import sys

from absl import flags


def config_arg(argv: list[str]) -> str | None:
  """The value of --config in argv, or None."""
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      return arg.split("=", 1)[1]
    if arg == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _config_from_file(spec: str | None):
  """(ConfigDict, None) of a --config value "path[:variant]", or (None, the exception)."""
  if not spec:
    return None, None
  path, _, variant = spec.partition(":")
  try:
    loader = importlib.util.spec_from_file_location("_flaxgpt_config", path)
    module = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(module)
    return (module.get_config(variant) if variant else module.get_config()), None
  except Exception as e:  # pylint: disable=broad-except
    return None, e


def _lookup(config, dotted: str):
  """(value, None) of config.<dotted>, or (None, a sentence naming the unknown key)."""
  path = dotted.split(".")
  node = config
  for i, part in enumerate(path):
    keys = list(node.keys()) if hasattr(node, "keys") else []
    if part not in keys:
      close = difflib.get_close_matches(part, keys, n=1)
      hint = f" (did you mean {'.'.join(path[:i] + close + path[i + 1:])!r}?)" if close else ""
      return None, f"Unknown config key {dotted!r} in --config.{dotted}{hint}."
    node = node[part]
  return node, None


_TYPE_WORDS = {int: "an integer", float: "a number", str: "a string", bool: "True or False"}


def _type_words(config, dotted: str) -> str:
  parent, _, name = dotted.rpartition(".")
  node = _lookup(config, parent)[0] if parent else config
  try:
    kind = node.get_type(name)
  except Exception:  # pylint: disable=broad-except
    kind = None
  return _TYPE_WORDS.get(kind, f"a {getattr(kind, '__name__', 'valid value')}")


def _overrides(argv: list[str]) -> list[tuple[str, str]]:
  out = []
  for arg in argv:
    if arg.startswith("--config."):
      key, _, value = arg[len("--config."):].partition("=")
      out.append((key, value))
  return out


def explain_flag_error(e: Exception, argv: list[str]) -> str:
  """One sentence for a flag parsing error."""
  spec = config_arg(argv)
  config, load_error = _config_from_file(spec)
  if load_error is not None:
    return f"Could not load --config {spec}: {load_error}".rstrip(".") + "."
  if config is not None:
    for key, raw in _overrides(argv):
      value, unknown = _lookup(config, key)
      if unknown:
        return unknown
      if f"--config.{key}=" in str(e):
        return (f"--config.{key} must be {_type_words(config, key)} (it is {value!r} in "
                f"{spec}); got {raw!r}.")
  message = str(e).splitlines()[0] if str(e) else type(e).__name__
  if "must have a value other than None" in message:
    return message.split(": ", 1)[-1].replace("must have a value other than None.",
                                              "is required.")
  return message.rstrip(".") + "."


_HELP_FLAGS = ("-h", "--help", "--helpshort", "--helpfull", "-?")


def fail(message: str, status: int = 2):
  """Print one `error:` line and exit (status 2: a mistake in the input)."""
  print(f"error: {message}", file=sys.stderr)
  sys.exit(status)


def parse_flags(flag_values, argv: list[str]) -> list[str]:
  """absl flag parsing for entry points with a --config file: a missing config file or a bad
  --config.* override becomes one `error:` line; --help exits 0."""
  spec = config_arg(argv)
  if spec is not None and not os.path.isfile(spec.partition(":")[0]):
    fail(f"Config file {spec.partition(':')[0]!r} does not exist.")
  try:
    return flag_values(argv)
  except SystemExit:  # absl's --help exits with status 1 after printing the usage
    if any(a in _HELP_FLAGS for a in argv[1:]):
      sys.exit(0)
    raise
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
    fail(explain_flag_error(e, argv))


def load_config(flag_values):
  """The --config ConfigDict, or one `error:` line with the config file's own error."""
  try:
    return flag_values.config
  except Exception as e:  # pylint: disable=broad-except  (the config file's own error)
    root = e
    while root.__cause__ is not None or root.__context__ is not None:
      root = root.__cause__ or root.__context__
    fail(f"Could not load --config {config_arg(sys.argv)}: {root}")
