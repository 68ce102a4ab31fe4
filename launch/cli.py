"""What every entry point in launch/ shares: one flag framework and one way to fail.

Flags are absl flags, each entry point's on a FlagValues of its own (so that the modules can be
imported side by side, as the tests do); experiment configs are ml_collections config files
(`--config path[:variant]`, any field overridable as `--config.<section>.<key>=value`). A
mistake in the input ends the program with one `error: <sentence>` line naming the bad value
and exit status 2: a bad flag or config override (explained here, where absl and ml_collections
would print tracebacks or several lines), a non-finite value of a float flag, an XLA_FLAGS
value XLA would refuse (training/xla_flags.py, asked before anything runs), or a UserError
raised by the library. Ctrl-C anywhere is one line, `interrupted; <what it left>`, and exit
status 130 (the entry point says what an interruption leaves; a library step that must not be
cut in half raises training.interrupts.Interrupted with its own note once it is done).

    FLAGS = flags.FlagValues()
    flags.DEFINE_string("workdir", None, "Where the run lives.", flag_values=FLAGS)

    def main(argv: list[str] | None = None) -> int:
      return cli.run(_main, FLAGS, __doc__, argv)   # --help, flag errors, UserError -> status 2

    def _main(args: list[str]) -> int:   # args: the positional arguments
      ...

    if __name__ == "__main__":
      sys.exit(main())
"""

from __future__ import annotations

import contextlib
import difflib
import gc
import importlib.util
import math
import os
import re
import signal
import sys
import threading
import traceback
from typing import Callable, NoReturn, Sequence

import ml_collections
from absl import flags
from ml_collections import config_flags

from model.errors import UserError

HELP_FLAGS = ("-h", "--help", "--helpshort", "--helpfull", "-?")
_TYPE_WORDS = {int: "an integer", float: "a number", str: "a string", bool: "True or False"}
_FLAG_TYPE_WORDS = {"int": "an integer", "float": "a number", "bool": "true or false",
                    "string": "a string", "multi_string": "a string"}


def fail(message: str, status: int = 2) -> NoReturn:
  """Print one `error:` line and exit (status 2: a mistake in the input)."""
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(status)


def run(body: Callable[[list[str]], int | None], flag_values: flags.FlagValues, doc: str,
        argv: Sequence[str] | None = None, *, interrupted: str = "nothing written",
        xla: bool = True) -> int:
  """Parse `argv` (default sys.argv[1:]) into `flag_values`, check $XLA_FLAGS (unless not
  `xla`: the entry point starts no XLA here), then return body(positional arguments) (None
  counts as 0). --help prints `doc` and the flags and exits 0; a bad flag or a UserError from
  `body` is one `error:` line and exit status 2; Ctrl-C is the line "interrupted;
  `interrupted`" (or the note of a training.interrupts.Interrupted) and exit status 130."""
  with _interrupts_raised():
    try:
      args = parse(flag_values, doc, argv)
      if xla:
        from training.xla_flags import check_xla_flags  # pylint: disable=import-outside-toplevel
        check_xla_flags()
      status = body(args)
    except UserError as e:
      fail(str(e))
    except KeyboardInterrupt as e:
      note = getattr(e, "note", None) or interrupted
      print(f"interrupted; {note}", file=sys.stderr, flush=True)
      # Exit now: no waiting for background threads, nor for a stdout that may be blocked.
      os._exit(130)  # pylint: disable=protected-access
  return 0 if status is None else status


@contextlib.contextmanager
def _interrupts_raised():
  """SIGINT raises KeyboardInterrupt, but never inside a garbage-collection callback or a
  __del__ (JAX runs one at every collection), where Python would print "Exception ignored" and
  go on: there it is sent again 50 ms later, once that code has returned."""
  if threading.current_thread() is not threading.main_thread():
    yield
    return

  def handler(signum, frame):  # pylint: disable=unused-argument
    finalizers = {getattr(cb, "__code__", None) for cb in gc.callbacks}
    while frame is not None:
      if frame.f_code in finalizers or frame.f_code.co_name == "__del__":
        threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGINT)).start()
        return
      frame = frame.f_back
    raise KeyboardInterrupt

  previous = signal.signal(signal.SIGINT, handler)
  try:
    yield
  finally:
    signal.signal(signal.SIGINT, previous)


def no_arguments(args: Sequence[str]) -> None:
  if args:
    raise UserError(f"Unexpected arguments: {' '.join(args)}.")


def parse(flag_values: flags.FlagValues, doc: str, argv: Sequence[str] | None = None
          ) -> list[str]:
  """absl parsing of `argv` (without the program name): returns the positional arguments.
  --help prints `doc` and the flags (exit 0); a missing config file, a bad --config.* override
  or a bad flag becomes one `error:` line (exit 2)."""
  argv = list(sys.argv[1:] if argv is None else argv)
  if any(arg in HELP_FLAGS for arg in argv):
    print(doc.rstrip() + "\n\nflags:\n" + _flags_help(flag_values))
    sys.exit(0)
  takes_config = _takes_config_file(flag_values)
  spec = config_arg(argv) if takes_config else None
  if spec is not None and not os.path.isfile(spec.partition(":")[0]):
    fail(f"Config file {spec.partition(':')[0]!r} does not exist.")
  flag_values.unparse_flags()  # a second call in one process starts from the defaults again
  full_argv = [sys.argv[0] if sys.argv else "flaxgpt", *argv]
  if takes_config:
    # ml_collections defines one flag per --config.<key> override when --config is parsed, and
    # executes the file into the module sys.modules["config_config"] (re-used if present): a
    # second call in one process must find neither the last call's flags nor its module.
    for name in [n for n in flag_values if n.startswith("config.")]:
      delattr(flag_values, name)
    sys.modules.pop("config_config", None)
  try:
    # ml_collections finds the overrides in sys.argv, not in the list being parsed, so `argv`
    # is sys.argv while absl parses it (for callers that pass their own, e.g. tests).
    with _as_sys_argv(full_argv if takes_config else None):
      args = flag_values(full_argv)[1:]
  except (Exception, SystemExit) as e:  # pylint: disable=broad-except  (a bad flag, or the
    fail(explain_flag_error(e, argv, flag_values))  # config file's own error)
  for name in flag_values:  # nan and inf parse as floats; no flag here means them (a
    value = flag_values[name].value  # config file's are checked with the config: run.py)
    if (flag_values[name].flag_type() == "float" and not name.startswith("config.")
        and isinstance(value, float) and not math.isfinite(value)):
      fail(f"--{name} must be a finite number, got {value!r}.")
  return args


@contextlib.contextmanager
def _as_sys_argv(argv: list[str] | None):
  if argv is None:
    yield
    return
  saved, sys.argv = sys.argv, list(argv)
  try:
    yield
  finally:
    sys.argv = saved


def load_config(flag_values: flags.FlagValues):
  """The --config ConfigDict, or one `error:` line with the config file's own error."""
  name = flag_values["config"].config_filename
  try:
    config = flag_values.config
  except (Exception, SystemExit) as e:  # pylint: disable=broad-except  (the file's own error)
    fail(config_error(name, e))
  if not isinstance(config, ml_collections.ConfigDict):
    fail(f"--config {name}: get_config() returned {type(config).__name__}, not an "
         f"ml_collections.ConfigDict (start from configs/common.py:base_config()).")
  return config


def overridden_keys(flag_values: flags.FlagValues) -> frozenset[str]:
  """The config keys the command line set (--config.model.num_layers=4 -> "model.num_layers"),
  after `parse`."""
  return frozenset(name[len("config."):] for name in flag_values
                   if name.startswith("config.") and flag_values[name].present)


def check_config(spec: str, overrides: Sequence[str]):
  """The ConfigDict that `--config spec` with the `--config.<key>=value` overrides gives, read
  exactly as launch.train reads them (for launchers that hand them on, e.g. launch.tpu): a
  missing file, an unknown key or a bad value is one `error:` line (exit 2)."""
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values, lock_config=True)
  parse(flag_values, "", ["--config", spec, *overrides])
  return load_config(flag_values)


def _takes_config_file(flag_values: flags.FlagValues) -> bool:
  """Whether --config is an ml_collections config file (config_flags.DEFINE_config_file)."""
  return "config" in flag_values and flag_values["config"].flag_type() == "config object"


def config_name(flag_values: flags.FlagValues) -> str:
  """The --config file's name without directory and extension: "gpt2_xl" for
  configs/gpt2_xl.py."""
  path = flag_values["config"].config_filename or ""
  return os.path.splitext(os.path.basename(path.partition(":")[0]))[0]


def _flags_help(flag_values: flags.FlagValues) -> str:
  """The entry point's own flags (not absl's --flagfile / --undefok)."""
  lines = []
  for module, module_flags in flag_values.flags_by_module_dict().items():
    if module.startswith("absl."):
      continue
    for flag in sorted(module_flags, key=lambda f: f.name):
      default = "" if flag.default is None else f" (default: {flag.default_as_str})"
      lines.append(f"  --{flag.name}: {flag.help}{default}")
  return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# One sentence for a flag error


def config_arg(argv: Sequence[str]) -> str | None:
  """The value of --config in argv, or None."""
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      return arg.split("=", 1)[1]
    if arg == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def config_error(spec: str, e: BaseException) -> str:
  """One sentence for an exception raised while loading the config file `spec`
  ("path[:variant]"): the file, the line of it that raised, the error's type and message."""
  path = os.path.abspath(spec.partition(":")[0])
  chain = [e]  # e, what it was raised from or while handling, ...
  while (chain[-1].__cause__ or chain[-1].__context__) is not None and len(chain) < 20:
    chain.append(chain[-1].__cause__ or chain[-1].__context__)

  def file_lines(x):
    return [n for f, n in traceback.walk_tb(x.__traceback__)
            if os.path.abspath(f.f_code.co_filename) == path]

  # The file's own error: the outermost one raised in the file (ml_collections may wrap it),
  # else a SyntaxError (compiling raises it outside the file), else the innermost.
  root = next((x for x in chain if file_lines(x)),
              next((x for x in chain if isinstance(x, SyntaxError)), chain[-1]))
  lines = file_lines(root)
  line = lines[-1] if lines else (root.lineno if isinstance(root, SyntaxError) else None)
  where = f" (line {line})" if line else ""
  if isinstance(root, SystemExit):
    what = f"it called sys.exit({root.code!r})"
  elif isinstance(root, AttributeError) and getattr(root, "name", None) == "get_config":
    what, where = "it defines no get_config() function", ""
  elif isinstance(root, SyntaxError):
    what = f"SyntaxError: {root.msg}"
  else:
    message = str(root).splitlines()[0] if str(root) else ""
    what = type(root).__name__ + (f": {message}" if message else "")
  return f"Could not load --config {spec}{where}: {what}".rstrip(".") + "."


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
  except (Exception, SystemExit) as e:  # pylint: disable=broad-except
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


def _type_words(config, dotted: str) -> str:
  parent, _, name = dotted.rpartition(".")
  node = _lookup(config, parent)[0] if parent else config
  try:
    kind = node.get_type(name)
  except Exception:  # pylint: disable=broad-except
    kind = None
  return _TYPE_WORDS.get(kind, f"a {getattr(kind, '__name__', 'valid value')}")


def _overrides(argv: Sequence[str]) -> list[tuple[str, str]]:
  """(key, raw value) of each --config.<key>=value or --config.<key> value, in order."""
  out = []
  for i, arg in enumerate(argv):
    if arg.startswith("--config."):
      key, eq, value = arg[len("--config."):].partition("=")
      if not eq and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
        value = argv[i + 1]
      out.append((key, value))
  return out


def _flag_words(flag) -> str:
  choices = getattr(flag.parser, "enum_values", None)
  if choices:
    return f"one of {', '.join(choices)}"
  return _FLAG_TYPE_WORDS.get(flag.flag_type(), "valid")


def explain_flag_error(e: BaseException, argv: Sequence[str], flag_values: flags.FlagValues) -> str:
  """One sentence for a flag parsing error."""
  spec = config_arg(argv) if _takes_config_file(flag_values) else None
  config, load_error = _config_from_file(spec)
  if load_error is not None:
    return config_error(spec, load_error)
  if config is not None:
    for key, raw in _overrides(argv):
      value, unknown = _lookup(config, key)
      if unknown:
        return unknown
    for key, raw in _overrides(argv):
      # absl names the value it could not parse; a key given twice names the bad one.
      if f"--config.{key}={raw}: " in str(e):
        value = _lookup(config, key)[0]
        return (f"--config.{key} must be {_type_words(config, key)} (it is {value!r} in "
                f"{spec}); got {raw!r}.")
  message = str(e).splitlines()[0] if str(e) else type(e).__name__
  if "must have a value other than None" in message:
    return message.split(": ", 1)[-1].replace("must have a value other than None.",
                                              "is required.")
  unknown = re.match(r"Unknown command line flag '([^']+)'", message)
  if unknown:
    return f"Unknown flag --{unknown.group(1)}; see --help."
  bad_value = re.match(r"flag --(\w+)=(.*?): (.*)", message)
  if bad_value and bad_value.group(1) in flag_values:
    name, raw, why = bad_value.groups()
    # absl's bound checks: "0 is not a positive integer", "-1 is not a non-negative integer"
    bound = re.fullmatch(r".* is not (an? .*?)\.?", why)
    words = bound.group(1) if bound else _flag_words(flag_values[name])
    return f"--{name} must be {words}, got {raw!r}."
  return message.rstrip(".") + "."
