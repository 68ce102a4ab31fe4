"""config.json's values, read and checked in one place: every converter of model/hf/ reads the
fields it uses through `read_fields`, which checks each value's type and range and names the
file and the field of a bad one (`num_attention_heads: 0`, `rope_theta: null`, `hidden_size:
"64"`, a rope factor "abc") in one sentence, instead of a traceback from the arithmetic that
would use it.

    c = read_fields(hf_config, {"hidden_size": (768, "int+"), "head_dim": (None, "int+?")},
                    "ckpt/config.json")
"""

from __future__ import annotations

import math
from typing import Any

from model.errors import UserError

# kind -> (check, words); a kind ending in "?" also allows null (JSON's null, Python's None).
KINDS = {
    "int+": (lambda v: _is_int(v) and v > 0, "a positive integer"),
    "int0": (lambda v: _is_int(v) and v >= 0, "a whole number >= 0"),
    "float+": (lambda v: _is_number(v) and v > 0, "a positive number"),
    "float0": (lambda v: _is_number(v) and v >= 0, "a number >= 0"),
    "prob": (lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "id": (lambda v: _is_int(v) and v >= 0, "a token id (a whole number >= 0)"),
    "ints": (lambda v: isinstance(v, list) and all(_is_int(x) and x >= 0 for x in v),
             "a list of whole numbers >= 0"),
}


def _is_int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
  return (isinstance(value, (int, float)) and not isinstance(value, bool)
          and math.isfinite(value))


def read_fields(hf_config: dict[str, Any], schema: dict[str, tuple[Any, str]], source: str,
                prefix: str = "") -> dict[str, Any]:
  """{field: value} of each `schema` field (name -> (default when absent, kind)), checked:
  UserError "`source`: `prefix``field` must be <kind's words>, got <value>." for a bad one.
  `prefix` names an object inside config.json ("rope_scaling.")."""
  out = {}
  for name, (default, kind) in schema.items():
    value = hf_config.get(name, default)
    nullable = kind.endswith("?")
    check, words = KINDS[kind.rstrip("?")]
    if value is None and nullable:
      out[name] = None
      continue
    if not check(value):
      words = f"null or {words}" if nullable else words
      raise UserError(f"{source}: {prefix}{name} must be {words}, got {value!r}.")
    out[name] = float(value) if kind.startswith(("float", "prob")) else value
  return out


def read_model_type(hf_config: dict[str, Any], source: str, supported) -> str:
  """config.json's model_type, which must be there: without it a checkpoint is not guessed."""
  kind = hf_config.get("model_type")
  if kind is None:
    raise UserError(f"{source} has no model_type; a Hugging Face checkpoint's config.json names "
                    f"its model (\"model_type\": one of {', '.join(supported)}).")
  if kind not in supported:
    raise UserError(f"{source}: model_type {kind!r} is not supported; supported: "
                    f"{', '.join(supported)}.")
  return kind
