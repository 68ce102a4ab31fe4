"""Writes docs/configuration.md, the reference of every config key, from the code.

  python docs/make_configuration.py           # rewrite docs/configuration.md
  python docs/make_configuration.py --check   # exit 1 (and say so) if the file is out of date

The keys and defaults are configs/common.py's base_config(); a key's documentation is the
comment beside its default or the comment lines just above it, in the file that sets it:

  configs/common.py          init_from, train, optimizer, mesh, eval, checkpoint, log
  training/data/tasks.py     data (default_data_config), and each task file's add_config
                             (training/data/*.py)
  sharding/rules.py          mesh.rules (DEFAULT_RULES)
  model/config.py            model (ModelConfig's fields; ModelConfig's defaults are GPT-2 small)

Allowed values come from the tuples the code validates against (model.config.CHOICES,
training.optimizer.SCHEDULES, training.data.SOURCES, training.data.tasks.TASKS,
model.tokenizer.TOKENIZER_NAMES, sharding.rules.MESH_AXES); other keys give their type.
tests/test_docs.py fails when the file and the code disagree, or when a key has no comment.
"""

from __future__ import annotations

import ast
import dataclasses
import io
import pathlib
import re
import sys
import tokenize

REPO = pathlib.Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))

from configs import common  # noqa: E402  (after the repository is on the path)
from model import config as model_config  # noqa: E402
from model.tokenizer import TOKENIZER_NAMES  # noqa: E402
from sharding import rules  # noqa: E402
from training.data import SOURCES  # noqa: E402
from training.data.examples import OVERLONG  # noqa: E402
from training.data.packing import PACKINGS  # noqa: E402
from training.data.tasks import TASKS  # noqa: E402
from training.dpo import LOSSES  # noqa: E402
from training.optimizer import SCHEDULES  # noqa: E402

OUT = REPO / "docs" / "configuration.md"
REGENERATE = "python docs/make_configuration.py"

# Where each section's documentation lives (a key's comment), and the variable its function
# assigns to: c.<section>.<key> in base_config, cfg.<key> in default_data_config.
COMMON, DATA, RULES, MODEL = ("configs/common.py", "training/data/tasks.py",
                              "sharding/rules.py", "model/config.py")
SECTION_INTROS = {
    "init_from": "Fine-tuning: the weights a new run starts from.",
    "model": "The model: every field of `ModelConfig` (model/config.py).",
    "train": "The training loop.",
    "optimizer": "AdamW and its learning-rate schedule (training/optimizer.py).",
    "mesh": "The device mesh (sharding/mesh.py) and the logical-axis rules (sharding/rules.py).",
    "data": "What the batches are made of (training/data/).",
    "eval": "Evaluation during training.",
    "checkpoint": "Orbax checkpoints in WORKDIR/checkpoints/.",
    "log": "metrics.jsonl, TensorBoard and the console.",
}
CONFIG_CHOICES = {"optimizer.schedule": SCHEDULES, "data.source": SOURCES,
                  "data.task": ("",) + tuple(TASKS),
                  "data.overlong": OVERLONG, "data.packing": PACKINGS, "data.tokenizer": TOKENIZER_NAMES,
                  "train.dpo.loss": LOSSES}
TYPE_WORDS = {int: "integer", float: "number", bool: "True, False", str: "string"}


class UndocumentedKey(Exception):
  """A config key without a comment beside or above its default."""


def _comments(text: str) -> tuple[dict[int, str], set[int]]:
  """(line -> its comment's text, the lines that hold only a comment) of Python source."""
  comments, code_lines = {}, set()
  for tok in tokenize.generate_tokens(io.StringIO(text).readline):
    if tok.type == tokenize.COMMENT:
      comments[tok.start[0]] = tok.string.lstrip("#").strip()
    elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
                          tokenize.ENDMARKER):
      code_lines.update(range(tok.start[0], tok.end[0] + 1))
  return comments, set(comments) - code_lines


def _doc(node: ast.AST, comments: dict[int, str], alone: set[int]) -> str:
  """The comment lines just above `node` (not a `# --- heading ---`), then those beside it."""
  above, line = [], node.lineno - 1
  while line in alone and not comments[line].startswith("---"):
    above.insert(0, comments[line])
    line -= 1
  beside = [comments[n] for n in range(node.lineno, node.end_lineno + 1)
            if n in comments and n not in alone]
  return " ".join(above + beside).strip()


def _dotted(node: ast.AST) -> list[str] | None:
  """c.train.steps -> ["c", "train", "steps"]; None for anything else."""
  parts = []
  while isinstance(node, ast.Attribute):
    parts.insert(0, node.attr)
    node = node.value
  return [node.id] + parts if isinstance(node, ast.Name) else None


def _function_docs(path: str, function: str, variable: str, prefix: str) -> dict[str, str]:
  """{key: comment} of the `variable.a.b = ...` statements in `function` of `path`."""
  text = (REPO / path).read_text()
  comments, alone = _comments(text)
  docs = {}
  for fn in ast.walk(ast.parse(text)):
    if isinstance(fn, ast.FunctionDef) and fn.name == function:
      for node in ast.walk(fn):
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
          parts = _dotted(node.targets[0])
          if parts and parts[0] == variable and len(parts) > 1:
            docs[prefix + ".".join(parts[1:])] = _doc(node, comments, alone)
  return docs


def _model_docs() -> dict[str, str]:
  """{model.<field>: comment} of ModelConfig's fields."""
  text = (REPO / MODEL).read_text()
  comments, alone = _comments(text)
  for cls in ast.walk(ast.parse(text)):
    if isinstance(cls, ast.ClassDef) and cls.name == "ModelConfig":
      return {f"model.{node.target.id}": _doc(node, comments, alone) for node in cls.body
              if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)}
  raise RuntimeError(f"{MODEL} has no class ModelConfig")


def _rules_docs() -> dict[str, str]:
  """{mesh.rules.<name>: what it is} of DEFAULT_RULES (with the comment beside an entry)."""
  text = (REPO / RULES).read_text()
  comments, alone = _comments(text)
  docs = {}
  for node in ast.walk(ast.parse(text)):
    if (isinstance(node, ast.Tuple) and len(node.elts) == 2
        and isinstance(node.elts[0], ast.Constant) and isinstance(node.elts[0].value, str)
        and node.elts[0].value in dict(rules.DEFAULT_RULES)):
      name = node.elts[0].value
      kind = ("the KV cache's" if name.startswith("cache_") else
              "activations'" if name.startswith("act_") else "parameters'")
      beside = comments.get(node.lineno) if node.lineno not in alone else None
      docs[f"mesh.rules.{name}"] = (f"The mesh axes that split {kind} logical axis `{name}`"
                                    + (f": {beside}" if beside else "") + ".")
  return docs


def _placeholders() -> dict[str, str]:
  """{key: what None means} from configs/common.py's docstring."""
  return {m.group(1): m.group(2) for m in
          re.finditer(r"^\s+([a-z_.]+)\s+None: (.+)$", common.__doc__ or "", re.M)}


def key_docs() -> dict[str, str]:
  """Every config key's documentation, from the comments in the code."""
  docs = _function_docs(COMMON, "base_config", "c", "")
  docs.update(_function_docs(DATA, "default_data_config", "cfg", "data."))
  for path in sorted((REPO / "training" / "data").glob("*.py")):  # each task's own keys
    docs.update(_function_docs(str(path.relative_to(REPO)), "add_config", "cfg", "data."))
  docs.update(_rules_docs())
  docs.update(_model_docs())
  return docs


def _flat(config, prefix: str = "") -> list[tuple[str, object]]:
  """[(dotted key, field reference or value)] of a ConfigDict, in its order."""
  rows = []
  for name in config.keys():
    value = config[name]
    key = prefix + name
    if hasattr(value, "keys"):
      rows.extend(_flat(value, key + "."))
    else:
      rows.append((key, config.get_ref(name) if hasattr(config, "get_ref") else value))
  return rows


def _format(value) -> str:
  if value is None:
    return "None"
  if isinstance(value, str):
    return f'`"{value}"`'
  return f"`{value!r}`"


def _allowed(key: str, kind: type, optional: bool) -> str:
  field = key.removeprefix("model.")
  if key.startswith("model.") and field in model_config.CHOICES:
    names = model_config.CHOICES[field]
  elif key in CONFIG_CHOICES:
    names = CONFIG_CHOICES[key]
  elif key.startswith("mesh.rules."):
    return f"{', '.join(rules.MESH_AXES)}, several joined by commas, or none"
  else:
    return TYPE_WORDS.get(kind, kind.__name__) + (", or None" if optional else "")
  return " \\| ".join(f'`"{n}"`' for n in names)


def _model_field_types() -> dict[str, tuple[type, bool]]:
  kinds = {"int": int, "float": float, "bool": bool, "str": str}
  out = {}
  for f in dataclasses.fields(model_config.ModelConfig):
    words = str(f.type).replace(" ", "").split("|")
    out[f.name] = (kinds[words[0]], "None" in words)
  return out


def _cell(text: str) -> str:
  return text.replace("|", "\\|")


def render() -> str:
  """docs/configuration.md as the code says it should be (UndocumentedKey for a key without a
  comment)."""
  docs, none_means = key_docs(), _placeholders()
  config = common.base_config()
  refs = dict(_flat(config))
  missing = [key for key in refs if not docs.get(key)]
  if missing:
    where = {k: (MODEL if k.startswith("model.") else DATA if k.startswith("data.") else
                 RULES if k.startswith("mesh.rules.") else COMMON) for k in missing}
    raise UndocumentedKey(
        "config key(s) without documentation: " + ", ".join(
            f"{k} (in {where[k]})" for k in missing)
        + f"; add a comment beside or above each default, then run `{REGENERATE}`.")
  # The order of the code: sections as base_config() assigns them, keys as their files list them.
  sections = [key for key in docs if "." not in key]
  position = {key: i for i, key in enumerate(docs)}
  position.update({key: position["mesh.rules"] + i / 1000 for i, key in enumerate(docs)
                   if key.startswith("mesh.rules.")})
  keys = sorted(refs, key=lambda k: (sections.index(k.split(".")[0]), position[k]))
  model_defaults = {f.name: f.default for f in dataclasses.fields(model_config.ModelConfig)}
  model_types = _model_field_types()
  tiny = {k.removeprefix("model."): refs[k].get() for k in keys if k.startswith("model.")}
  out = [
      "# Configuration reference",
      "",
      f"Generated by `{REGENERATE}` from the code (do not edit by hand; tests/test_docs.py",
      "checks that it matches). Every key below can be overridden on the command line of",
      "`launch.train`, `launch.benchmark`, `launch.breakdown`, `launch.aot` and `launch.tpu train`",
      "as `--config.<section>.<key>=value`. Experiment files in configs/ start from",
      "`configs.common.base_config()` and change what differs; a key's comment in the code is",
      "its documentation here (see the docstring of docs/make_configuration.py).",
  ]
  section = None
  for key in keys:
    top = key.split(".")[0]
    if top != section:
      section = top
      intro = " ".join(t for t in (SECTION_INTROS.get(section, ""), docs.get(section, "")) if t)
      out += ["", f"## `{section}`", "", intro, ""]
      if section == "model":
        differ = ", ".join(
            f"{name} {_format(tiny[name])}" + (f" ({none_means[f'model.{name}']})" if tiny[
                name] is None and f"model.{name}" in none_means else "")
            for name in tiny if tiny[name] != model_defaults[name])
        out += ["The default column is `ModelConfig`'s (GPT-2 small). `base_config()` starts",
                f"from the `tiny` preset instead, which differs in: {differ}. Every file in",
                "configs/ names its own preset (`model_section(...)`, model/config.py).", ""]
      out += ["| key | default | allowed | what it does |", "| --- | --- | --- | --- |"]
    if key.startswith("model."):
      field = key.removeprefix("model.")
      kind, optional = model_types[field]
      default = model_defaults[field]
    else:
      kind, optional = refs[key].get_type(), refs[key].get() is None
      default = refs[key].get()
    doc = docs[key]
    if default is None and key in none_means and "None" not in doc:
      doc += f" None: {none_means[key]}."
    out.append(f"| `{key}` | {_format(default)} | {_allowed(key, kind, optional)} | "
               f"{_cell(doc)} |")
  return "\n".join(out).rstrip() + "\n"


def main(argv: list[str]) -> int:
  try:
    text = render()
  except UndocumentedKey as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  if "--check" in argv:
    if not OUT.exists() or OUT.read_text() != text:
      print(f"error: {OUT.relative_to(REPO)} is out of date; run `{REGENERATE}`.",
            file=sys.stderr)
      return 1
    return 0
  OUT.write_text(text)
  print(f"wrote {OUT.relative_to(REPO)} ({len(text.splitlines())} lines)")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
