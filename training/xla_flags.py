"""XLA flags checked before anything runs, by XLA itself.

XLA reads $XLA_FLAGS once, when a program first needs it (a backend starts, a computation
compiles), and a flag it does not know or a value it cannot read ends the process with a
fatal log line: after the data was read and the weights loaded, with a traceback-less exit 1.
`check_xla_flags` asks XLA's own parser first, in a child process (the parse cannot be undone
in this one, and it ends the process that makes it): the child builds XLA's compile options,
which parses the flags exactly as every XLA client does. A bad flag is one UserError sentence
naming it. Flags that parsed are remembered (this process, and a file per flags string and
jaxlib version under the cache directory, $FLAXGPT_CACHE_DIR or ~/.cache/flaxgpt), so the
child runs once per new XLA_FLAGS value: 0.54-0.67 s, then 0.1-0.3 ms (2 vCPUs of an Intel Xeon
under load, 2026-12-05; launch.* imports this module's own imports anyway).

    check_xla_flags()                                     # $XLA_FLAGS (nothing when unset)
    check_xla_flags(flags + " --xla_gpu_enable_triton_gemm=false", "--flag_sets cublas_gemms")
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import subprocess
import sys

from model.errors import UserError

# What the child runs: XLA's CompileOptions read the debug options from XLA_FLAGS, with the
# same parser (and the same fatal error for an unknown flag) as a backend starting.
PARSE_IN_CHILD = "from jaxlib import xla_client; xla_client.CompileOptions()"
_PARSED: set[str] = set()  # flag strings this process knows XLA accepts


def _marker(flags: str) -> str:
  """The file that says XLA accepted `flags` (with this jaxlib), under the cache directory of
  training/data/bin.py's cache_root (not imported: it brings in jax, ~1 s at every start)."""
  spec = importlib.util.find_spec("jaxlib")  # which jaxlib, without importing it
  folder = (spec.submodule_search_locations or [""])[0] if spec else ""
  try:
    with open(os.path.join(folder, "version.py"), "rb") as f:
      version = hashlib.sha256(f.read()).hexdigest()
  except OSError:
    version = ""
  key = hashlib.sha256(f"{folder}\0{version}\0{flags}".encode()).hexdigest()[:32]
  root = os.environ.get("FLAXGPT_CACHE_DIR") or os.path.join("~", ".cache", "flaxgpt")
  return os.path.join(os.path.expanduser(root), "xla_flags", key)


def check_xla_flags(flags: str | None = None, what: str = "XLA_FLAGS") -> None:
  """UserError naming the flag XLA does not know (or whose value it cannot read) in `flags`
  (default: $XLA_FLAGS); `what` names where they came from."""
  flags = os.environ.get("XLA_FLAGS", "") if flags is None else flags
  if not flags.strip() or flags in _PARSED:
    return
  marker = _marker(flags)
  if os.path.exists(marker):
    _PARSED.add(flags)
    return
  env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
  try:
    child = subprocess.run([sys.executable, "-c", PARSE_IN_CHILD], env=env, capture_output=True,
                           text=True, timeout=300, check=False)
  except (OSError, subprocess.TimeoutExpired):  # cannot ask: XLA will say it itself
    return
  if child.returncode != 0:
    message = explain(child.stderr, flags, what)
    if message is None:  # the child failed otherwise (not XLA's flag parser): do not guess
      return
    raise UserError(message)
  _PARSED.add(flags)
  try:
    os.makedirs(os.path.dirname(marker), exist_ok=True)
    with open(marker, "w", encoding="utf-8") as f:
      f.write(flags + "\n")
  except OSError:  # a read-only cache: ask again next time
    pass


def explain(stderr: str, flags: str, what: str) -> str | None:
  """One sentence for XLA's complaint about `flags` (its log lines in `stderr`); None when
  `stderr` holds none (the child failed for another reason)."""
  unknown = re.search(r"Unknown flags? in XLA_FLAGS: (.*)", stderr)
  if unknown:
    names = unknown.group(1).split()
    listed = ", ".join(names)
    return (f"{what} holds {'a flag' if len(names) == 1 else 'flags'} XLA does not know: "
            f"{listed} (XLA_FLAGS={flags!r}); correct or remove "
            f"{'it' if len(names) == 1 else 'them'}.")
  value = re.search(r"Couldn't interpret value (.*) for flag (\w+)\.", stderr)
  if value:
    return (f"{what}: XLA cannot read the value {value.group(1)!r} of --{value.group(2)} "
            f"(XLA_FLAGS={flags!r}); give it a value of its type.")
  if re.search(r"Could not open file .* to read flags", stderr):
    return (f"{what} {flags!r} does not start with --, so XLA reads it as a file of flags, "
            f"and there is no such file; write the flags as --xla_name=value.")
  fatal = re.search(r"^F\d{4} [\d:.]+\s+\d+ parse_flags_from_env\.cc:\d+\] (.*)$", stderr,
                    re.MULTILINE)
  if fatal:
    return f"{what} {flags!r} is refused by XLA: {fatal.group(1).rstrip('.')}."
  return None
