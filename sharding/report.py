"""How many bytes of parameters each device holds under a mesh, from abstract shapes alone."""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sharding.mesh import describe
from sharding.partition import (abstract_model_params, fit_spec, logical_to_mesh_specs,
                                strip_boxes)
from sharding.rules import DEFAULT_RULES, Rules


@dataclasses.dataclass(frozen=True)
class ArrayPlacement:
  """One array of a pytree under a mesh: its path, shapes, spec and the mesh axes its rule asked
  for that could not be used (they do not divide the dimension)."""
  path: str
  shape: tuple[int, ...]
  dtype: np.dtype
  spec: PartitionSpec
  shard_shape: tuple[int, ...]
  unused_axes: tuple[str, ...]

  @property
  def total_bytes(self) -> int:
    return math.prod(self.shape) * self.dtype.itemsize

  @property
  def shard_bytes(self) -> int:
    return math.prod(self.shard_shape) * self.dtype.itemsize


def _path(keys) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in keys)


def _mesh_axes(spec: PartitionSpec) -> set[str]:
  return {a for entry in spec if entry is not None
          for a in (entry if isinstance(entry, tuple) else (entry,))}


def placements(abstract_tree: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES
               ) -> list[ArrayPlacement]:
  """Where every array of a (possibly boxed) abstract pytree goes under `mesh` and `rules`."""
  wanted = jax.tree_util.tree_leaves(logical_to_mesh_specs(abstract_tree, rules),
                                     is_leaf=lambda x: isinstance(x, PartitionSpec))
  leaves = jax.tree_util.tree_leaves_with_path(strip_boxes(abstract_tree))
  out = []
  for (keys, leaf), want in zip(leaves, wanted):
    shape = tuple(leaf.shape)
    spec = fit_spec(want, shape, mesh)
    shard_shape = tuple(NamedSharding(mesh, spec).shard_shape(shape))
    unused = tuple(sorted(a for a in _mesh_axes(want) - _mesh_axes(spec) if mesh.shape[a] > 1))
    out.append(ArrayPlacement(_path(keys), shape, np.dtype(leaf.dtype), spec, shard_shape,
                              unused))
  return out


def bytes_per_device(abstract_tree: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES
                     ) -> dict[str, float]:
  """From shapes alone: total bytes of a (possibly boxed) pytree and the bytes each device
  holds under `mesh` (shards are even: fit_spec only keeps axes that divide)."""
  rows = placements(abstract_tree, mesh, rules)
  total = sum(r.total_bytes for r in rows)
  per_device = sum(r.shard_bytes for r in rows)
  return {"total_bytes": total, "per_device_bytes": per_device,
          "fraction": per_device / total if total else 0.0}


def _fmt_bytes(n: float) -> str:
  for unit in ("B", "KiB", "MiB", "GiB"):
    if n < 1024 or unit == "GiB":
      return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
    n /= 1024
  return f"{n:.2f} GiB"


def _fmt_shape(shape: tuple[int, ...]) -> str:
  return "[" + ", ".join(str(n) for n in shape) + "]"


def format_param_report(cfg, mesh: Mesh, rules: Rules = DEFAULT_RULES, top: int = 5) -> str:
  """A few lines of text: parameter count and bytes, bytes per device (also with AdamW's two
  moments), the largest per-device arrays, and any rule axes that had to be dropped."""
  rows = placements(abstract_model_params(cfg), mesh, rules)
  count = sum(math.prod(r.shape) for r in rows)
  total = sum(r.total_bytes for r in rows)
  per_device = sum(r.shard_bytes for r in rows)
  lines = [
      f"Parameters: {count:,} ({_fmt_bytes(total)}) on {describe(mesh)}",
      f"Per device: {_fmt_bytes(per_device)} ({100 * per_device / total:.1f}% of the total); "
      f"with AdamW's two moments: {_fmt_bytes(3 * per_device)}",
      "Largest per-device arrays:",
  ]
  width = max(len(r.path) for r in rows)
  for r in sorted(rows, key=lambda r: -r.shard_bytes)[:top]:
    lines.append(f"  {r.path:<{width}}  {_fmt_shape(r.shape)} -> {_fmt_shape(r.shard_shape)}  "
                 f"{r.spec}  {_fmt_bytes(r.shard_bytes)}")
  unsplit = {}  # one line per kind of array: h_0 ... h_47 -> h_*
  for r in rows:
    if r.unused_axes:
      unsplit.setdefault((re.sub(r"h_\d+", "h_*", r.path), r.shape, r.unused_axes), None)
  for path, shape, axes in unsplit:
    lines.append(f"Not split over {', '.join(axes)} (it does not divide the size): "
                 f"{path} {_fmt_shape(shape)}")
  return "\n".join(lines)
