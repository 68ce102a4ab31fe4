"""Batch placement: host-local numpy rows -> one global jax.Array split over the batch axes.

On one process the host holds the whole global batch. On several, each process feeds only the
rows its own devices hold: `process_batch_indices(global_batch_size, mesh)` says which rows of
the global batch those are (in the order `shard_batch` expects them), so a data pipeline that
builds the global batch of a step deterministically and keeps those rows gives the same global
array on any number of hosts.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from model.errors import UserError
from sharding.rules import DEFAULT_RULES, Rules


def batch_axes(rules: Rules = DEFAULT_RULES) -> tuple[str, ...]:
  """The mesh axes the batch is split over: the rule for "act_batch" (data, fsdp, expert)."""
  axes = dict(rules).get("act_batch")
  return () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))


def batch_sharding(mesh: Mesh, ndim: int = 2, rules: Rules = DEFAULT_RULES) -> NamedSharding:
  """Leading (batch) axis split over the batch axes (data, fsdp, expert), the rest replicated."""
  return NamedSharding(mesh, PartitionSpec(batch_axes(rules) or None, *([None] * (ndim - 1))))


def batch_size_multiple(mesh: Mesh, rules: Rules = DEFAULT_RULES) -> int:
  """The global batch must be a multiple of this (devices along the batch axes)."""
  return math.prod(mesh.shape[a] for a in batch_axes(rules))


def _check_global_batch(global_batch_size: int, mesh: Mesh, rules: Rules) -> None:
  multiple = batch_size_multiple(mesh, rules)
  if global_batch_size <= 0 or global_batch_size % multiple:
    names = " x ".join(batch_axes(rules)) or "no axis"
    raise UserError(f"Global batch size {global_batch_size} must be a positive multiple of "
                    f"{multiple} ({names}: the devices the batch is split over).")


def process_batch_indices(global_batch_size: int, mesh: Mesh, rules: Rules = DEFAULT_RULES
                          ) -> np.ndarray:
  """Rows of the global batch that this process's devices hold, ascending: the rows it passes
  to shard_batch. All of them on one process; 1/process_count of them when every process
  holds different rows; the same rows on processes whose devices are replicas (tensor across
  hosts)."""
  _check_global_batch(global_batch_size, mesh, rules)
  index_map = batch_sharding(mesh, 1, rules).addressable_devices_indices_map(
      (global_batch_size,))
  rows = set()
  for (rows_slice,) in index_map.values():
    rows.update(range(*rows_slice.indices(global_batch_size)))
  return np.asarray(sorted(rows), dtype=np.int64)


def process_batch_size(global_batch_size: int, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> int:
  """How many rows of each global batch this process feeds."""
  return len(process_batch_indices(global_batch_size, mesh, rules))


def _place(x: Any, mesh: Mesh, rules: Rules) -> jax.Array:
  x = np.asarray(x)
  if x.ndim == 0:
    raise UserError("shard_batch needs arrays with a leading batch axis, got a scalar.")
  multiple = batch_size_multiple(mesh, rules)
  local_shards = process_batch_size(multiple, mesh, rules)  # this process's distinct shards
  if x.shape[0] % local_shards:
    raise UserError(f"This process's batch of {x.shape[0]} rows does not split evenly over "
                    f"its {local_shards} batch shard(s) ({multiple} over "
                    f"{jax.process_count()} process(es)).")
  global_shape = (x.shape[0] // local_shards * multiple,) + x.shape[1:]
  return jax.make_array_from_process_local_data(batch_sharding(mesh, x.ndim, rules), x,
                                                global_shape)


def shard_batch(batch: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Any:
  """Host-local numpy arrays (a pytree) -> global jax.Arrays split over the batch axes.

  Each process passes only its own rows (the global batch on one process; on several, the rows
  `process_batch_indices` names); the global array is assembled without any host seeing the
  others' data."""
  return jax.tree_util.tree_map(lambda x: _place(x, mesh, rules), batch)
