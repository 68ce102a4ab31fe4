"""What keeps README.md and docs/*.md true to the code: `problems(text)` lists every statement
of a Markdown text that the code contradicts (tests/test_docs.py runs it on the real files and
on small stale texts).

Checked, in code spans, code blocks and prose alike:
- commands: every `python -m launch.X` names an entry point (launch/X.py with FLAGS and main);
  every `--flag` after it (on the same line, a line continued with a backslash, or an indented
  line under it in a code block) is a flag X defines (`--noflag` for a boolean one); every
  `--config.a.b` is a key of the config file the command names (`--config configs/F.py`), or of
  configs/common.py's base_config() when it names none;
- config files: every `configs/F.py[:variant]` exists and its get_config(variant) runs;
- paths: every path that starts with one of the repository's folders (model/, sharding/,
  training/, configs/, launch/, tests/, docs/, .ci/) exists;
- names in code spans: `launch.X` is a module of launch/; a dotted name that starts with a
  config section (`train.loss_chunk`, `data.tokenizer=hf:DIR`) is a config key, one that starts
  with a package (`model.hf.load_hf`) a name Python can import; a lone `--flag` is a flag of
  some entry point or a config key.
- measured figures (with `figures=True`, for README.md): a number with a unit of time (ms, s,
  min, h, 3m13s), of throughput (tokens/s, tok/s), of memory (MB, MiB, GB, GiB), a percentage or
  a ratio (1.22x) is a measurement, and its paragraph (a table: its row, its header and the
  paragraph just above it; a code block: the paragraph just above it) must name a date
  (YYYY-MM-DD) and a machine (a CPU model such as Xeon or EPYC, x86, VM or vCPU, or an
  accelerator: H100, H200, A100, TPU, v4, v5e, v5p, v6e). So a README states settings and
  formulas without these units ("an MFU of 0.5", "data.mlm_probability 0.15").
"""

from __future__ import annotations

import dataclasses
import importlib
import pathlib
import re

REPO = pathlib.Path(__file__).resolve().parent.parent
REPO_FOLDERS = ("model", "sharding", "training", "configs", "launch", "tests", "docs", ".ci")
PACKAGES = ("model", "sharding", "training", "launch", "configs")
CONFIG_SECTIONS = ("model", "train", "optimizer", "mesh", "data", "eval", "checkpoint", "log",
                   "init_from")

COMMAND = re.compile(r"python3?\s+-m\s+launch\.(\w+)")
FLAG = re.compile(r"(?<![\w-])--([A-Za-z_][\w.]*)")
CONFIG_FILE = re.compile(r"(?<![\w/])configs/(\w+)\.py(?::([\w.\-]+))?")
PATH = re.compile(r"(?<![\w./~-])((?:%s)/[\w./-]*\w)(?![\w<*{])" % "|".join(
    re.escape(f) for f in REPO_FOLDERS))
FILE_SUFFIXES = ("py", "md", "json", "jsonl", "bin", "txt", "png", "svg", "pdf", "safetensors",
                 "tiktoken", "toml", "cff", "npz", "tsv", "lock", "orbax")
CODE_SPAN = re.compile(r"`([^`]+)`")
DOTTED = re.compile(r"^([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+)(?:=\S*|\(.*\))?$")

NUM = r"(?<![\w.,])\d[\d,]*(?:\.\d+)?"
FIGURE = re.compile(
    rf"{NUM}\s?[kKMB]?\s?(?:tokens/s|tok/s)(?!\w)"
    rf"|{NUM}\s?(?:ms|s|min|h)(?!\w)"
    rf"|{NUM}\s?(?:MB|MiB|GB|GiB)(?!\w|/s)"
    rf"|{NUM}\s?%"
    rf"|{NUM}x(?!\w)"
    r"|(?<!\w)\d+m\d+(?:\.\d+)?s(?!\w)")
DATE = re.compile(r"\b20\d\d-\d\d-\d\d\b")
MACHINE = re.compile(r"\b(?:Xeon|EPYC|Ryzen|Core i\d|Apple M\d|x86|VM|vCPUs?|H100|H200|A100|"
                     r"TPU|v4|v5e|v5p|v6e|v5litepod-\d+)\b")


@dataclasses.dataclass
class Line:
  number: int  # 1-based, of the first physical line
  text: str
  fenced: bool


def logical_lines(text: str) -> list[Line]:
  """The text's lines with backslash continuations joined, and in code blocks the indented
  lines under a command joined to it (a synopsis written over several lines)."""
  lines, fenced, pending = [], False, None
  for number, raw in enumerate(text.splitlines(), 1):
    if raw.lstrip().startswith("```"):
      fenced = not fenced
      if pending:
        lines.append(pending)
        pending = None
      lines.append(Line(number, raw, False))
      continue
    if pending is not None:
      continues = pending.text.endswith("\\") or (
          fenced and raw[:1].isspace() and raw.strip() and COMMAND.search(pending.text))
      if continues:
        pending.text = pending.text.rstrip("\\").rstrip() + " " + raw.strip()
        continue
      lines.append(pending)
    pending = Line(number, raw, fenced)
  if pending:
    lines.append(pending)
  return lines


def _command_text(line: str, start: int) -> str:
  """The command starting at `start`: to the end of its code span, or of the shell command
  (&&, ;, a # comment)."""
  rest = line[start:]
  if line[:start].count("`") % 2:  # inside a code span
    rest = rest.split("`", 1)[0]
  return re.split(r"&&|;|\s#", rest, maxsplit=1)[0]


def _entry_point(name: str):
  if not (REPO / "launch" / f"{name}.py").is_file():
    return None
  module = importlib.import_module(f"launch.{name}")
  return module if hasattr(module, "FLAGS") and hasattr(module, "main") else None


def _config(name: str, variant: str | None):
  """(the ConfigDict of configs/name.py[:variant], None) or (None, why not)."""
  if not (REPO / "configs" / f"{name}.py").is_file():
    return None, f"configs/{name}.py does not exist"
  module = importlib.import_module(f"configs.{name}")
  if not hasattr(module, "get_config"):  # configs/common.py: the keys, not an experiment
    return (None, None) if variant is None else (
        None, f"configs/{name}.py has no get_config, so no variant {variant!r}")
  try:
    return (module.get_config(variant) if variant else module.get_config()), None
  except Exception as e:  # pylint: disable=broad-except  (an unknown variant, in its words)
    return None, f"configs/{name}.py:{variant} is not a variant it has ({str(e) or type(e)})"


def _has_key(config, key: str) -> bool:
  node = config
  for part in key.split("."):
    if not hasattr(node, "keys") or part not in node:
      return False
    node = node[part]
  return True


def _base_config():
  from configs.common import base_config  # pylint: disable=import-outside-toplevel
  return base_config()


def _flag_known(module, name: str) -> bool:
  flags = module.FLAGS
  if name in flags or name in ("help", "helpshort", "helpfull"):
    return True
  return name.startswith("no") and name[2:] in flags and flags[name[2:]].boolean


def _python_name(dotted: str) -> bool:
  """Whether `dotted` (model.hf.load_hf) is a module or an attribute Python can import."""
  parts = dotted.split(".")
  for cut in range(len(parts), 0, -1):
    try:
      obj = importlib.import_module(".".join(parts[:cut]))
    except ImportError:
      continue
    for attr in parts[cut:]:
      if not hasattr(obj, attr):
        return False
      obj = getattr(obj, attr)
    return True
  return False


def _check_commands(lines: list[Line], where) -> list[str]:
  out = []
  for line in lines:
    for match in COMMAND.finditer(line.text):
      name, loc = match.group(1), where(line)
      module = _entry_point(name)
      if module is None:
        out.append(f"{loc}: `python -m launch.{name}`: launch/{name}.py is not an entry point")
        continue
      command = _command_text(line.text, match.start())
      config_file = re.search(r"--config[= ]\s*" + CONFIG_FILE.pattern, command)
      config = None
      if config_file:
        config, _ = _config(config_file.group(1), config_file.group(2))
      for flag in FLAG.findall(command):
        if flag.endswith("."):
          continue  # a placeholder: --config.<section>.<key>
        if flag.startswith("config."):
          key = flag.removeprefix("config.")
          if not _has_key(config if config is not None else _base_config(), key):
            used = (f"configs/{config_file.group(1)}.py" if config_file
                    else "configs/common.py")
            out.append(f"{loc}: --config.{key}: no key {key!r} in {used}")
        elif not _flag_known(module, flag):
          out.append(f"{loc}: launch.{name} has no flag --{flag}")
  return out


def _check_code_spans(lines: list[Line], where) -> list[str]:
  out, base, entry_flags = [], None, None
  for line in lines:
    if line.fenced:
      continue
    for span in CODE_SPAN.findall(line.text):
      span = span.strip()
      loc = where(line)
      lone_flag = re.fullmatch(r"--([A-Za-z_][\w.]*)(?:[= ]\S*)?", span)
      if lone_flag and not lone_flag.group(1).startswith("xla"):
        flag = lone_flag.group(1)
        if flag.startswith("config."):
          base = base or _base_config()
          if not flag.endswith(".") and not _has_key(base, flag.removeprefix("config.")):
            out.append(f"{loc}: `{span}`: no such config key")
          continue
        if entry_flags is None:
          entry_flags = [_entry_point(p.stem) for p in sorted((REPO / "launch").glob("*.py"))]
        if not any(m is not None and _flag_known(m, flag) for m in entry_flags):
          out.append(f"{loc}: `{span}`: no entry point has this flag")
        continue
      dotted = DOTTED.match(span)
      if not dotted:
        continue
      name = dotted.group(1)
      first, last = name.split(".")[0], name.split(".")[-1]
      if last in FILE_SUFFIXES:  # a file's name (ours, or a peer's such as nanoGPT's)
        continue
      if first == "launch":
        module = name.split(".")[1]
        if not (REPO / "launch" / f"{module}.py").is_file():
          out.append(f"{loc}: `{span}`: launch/{module}.py does not exist")
        continue
      if first not in CONFIG_SECTIONS and first not in PACKAGES:
        continue
      base = base or _base_config()
      if first in CONFIG_SECTIONS and _has_key(base, name):
        continue
      if first in PACKAGES and _python_name(name):
        continue
      out.append(f"{loc}: `{span}`: neither a config key nor an importable name")
  return out


def _check_files(text: str, lines: list[Line], where) -> list[str]:
  out = []
  for line in lines:
    for match in CONFIG_FILE.finditer(line.text):
      _, why = _config(match.group(1), match.group(2))
      if why:
        out.append(f"{where(line)}: {why}")
    for match in PATH.finditer(line.text):
      path = match.group(1)
      if not (REPO / path).exists():
        out.append(f"{where(line)}: {path} does not exist")
  return out


def blocks(text: str) -> list[tuple[str, list[Line]]]:
  """The text as ("paragraph" | "table" | "code" | "heading", its lines), in order."""
  out, current, kind, fenced = [], [], None, False
  for number, raw in enumerate(text.splitlines(), 1):
    line = Line(number, raw, fenced)
    if raw.lstrip().startswith("```"):
      if fenced:
        out.append(("code", current))
        current, kind, fenced = [], None, False
      else:
        if current:
          out.append((kind, current))
        current, kind, fenced = [], "code", True
      continue
    if fenced:
      current.append(line)
      continue
    new_kind = ("heading" if raw.startswith("#") else "table" if raw.lstrip().startswith("|")
                else "paragraph" if raw.strip() else None)
    if new_kind != kind or new_kind == "heading":
      if current:
        out.append((kind, current))
      current, kind = [], new_kind
    if new_kind:
      current.append(line)
  if current and kind:
    out.append((kind, current))
  return out


def _figures(text: str) -> list[str]:
  return FIGURE.findall(CODE_SPAN.sub("", text))


def _dated(text: str) -> bool:
  return bool(DATE.search(text)) and bool(MACHINE.search(text))


def _check_figures(text: str, name: str) -> list[str]:
  out, previous = [], None
  for kind, lines in blocks(text):
    joined = "\n".join(line.text for line in lines)
    context = "\n".join(line.text for line in previous[1]) if (
        previous and previous[0] == "paragraph") else ""
    if kind == "table":
      header = lines[0].text
      for line in lines[2:]:
        figures = _figures(line.text)
        if figures and not _dated("\n".join((line.text, header, context))):
          out.append(f"{name}:{line.number}: {', '.join(figures[:3])} without a machine and a "
                     f"date in its row, the table's header or the paragraph above it")
    elif kind in ("paragraph", "code"):
      figures = _figures(joined)
      if figures and not _dated(joined + "\n" + (context if kind == "code" else "")):
        out.append(f"{name}:{lines[0].number}: {', '.join(figures[:3])} without a machine and "
                   f"a date in the same paragraph" + (" (or the one above the code block)"
                                                      if kind == "code" else ""))
    if kind != "code":
      previous = (kind, lines)
  return out


def problems(text: str, name: str = "README.md", figures: bool = True) -> list[str]:
  """Every statement of the Markdown `text` that the code contradicts (see the module
  docstring), as `name:line: what is wrong`."""
  lines = logical_lines(text)

  def where(line: Line) -> str:
    return f"{name}:{line.number}"

  out = _check_commands(lines, where) + _check_code_spans(lines, where) + _check_files(
      text, lines, where)
  if figures:
    out += _check_figures(text, name)
  return list(dict.fromkeys(out))  # a path that is also a config file: said once
