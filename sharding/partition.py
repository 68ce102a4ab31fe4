"""From logical annotations to NamedShardings: sharded creation, batch placement, reports."""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sharding.rules import BATCH_AXES, DEFAULT_RULES, Rules


def strip_boxes(tree: Any) -> Any:
  """Replace nn.Partitioned boxes by their values (no sharding constraint applied)."""
  return jax.tree_util.tree_map(lambda x: x.value if isinstance(x, nn.Partitioned) else x, tree,
                                is_leaf=lambda x: isinstance(x, nn.Partitioned))


@contextlib.contextmanager
def activate(mesh: Mesh, rules: Rules = DEFAULT_RULES):
  """Context in which the model's nn.with_logical_constraint calls take effect."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield


def _fit(spec: PartitionSpec, shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
  """Drop mesh axes from dimensions they do not divide (e.g. GPT-2's 50257-row embedding on a
  tensor axis of 2): that dimension is then replicated instead of failing to compile."""
  fitted = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    if axes is None:
      fitted.append(None)
      continue
    names = axes if isinstance(axes, tuple) else (axes,)
    kept = []
    for name in names:
      if dim % (math.prod(mesh.shape[n] for n in kept) * mesh.shape[name]) == 0:
        kept.append(name)
    fitted.append(tuple(kept) if len(kept) > 1 else (kept[0] if kept else None))
  return PartitionSpec(*fitted)


def logical_to_shardings(abstract_tree: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Any:
  """NamedShardings for a pytree whose leaves may be nn.Partitioned (boxed, from eval_shape of an
  init). Unannotated leaves are replicated. The returned tree has the unboxed structure."""
  specs = nn.get_partition_spec(abstract_tree)
  mesh_specs = nn.logical_to_mesh(specs, rules)
  shapes = strip_boxes(abstract_tree)

  def one(spec, leaf):
    spec = spec if isinstance(spec, PartitionSpec) else PartitionSpec()
    return NamedSharding(mesh, _fit(spec, tuple(leaf.shape), mesh))

  return jax.tree_util.tree_map(one, mesh_specs, shapes,
                                is_leaf=lambda x: isinstance(x, PartitionSpec) or x is None)


def create_sharded(init_fn: Callable[..., Any], mesh: Mesh, rules: Rules = DEFAULT_RULES,
                   *args) -> tuple[Any, Any]:
  """Run `init_fn(*args)` (which may return nn.Partitioned leaves) under jit with out_shardings
  derived from its logical annotations, so every array is born sharded: nothing is first
  materialised whole on one device. Returns (unboxed pytree, its shardings)."""
  with activate(mesh, rules):
    abstract = jax.eval_shape(init_fn, *args)
    shardings = logical_to_shardings(abstract, mesh, rules)
    values = jax.jit(lambda *a: nn.unbox(init_fn(*a)), out_shardings=shardings)(*args)
  return values, shardings


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  """Leading (batch) axis split over data and fsdp, the rest replicated."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([None] * (ndim - 1))))


def batch_size_multiple(mesh: Mesh) -> int:
  """The global batch must be a multiple of this (devices along the batch axes)."""
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def shard_batch(batch: Any, mesh: Mesh) -> Any:
  """Host-local numpy arrays -> global jax.Arrays split over the batch axes.

  On several hosts each process passes only its own rows (global batch / process_count); the
  global array is assembled without any host seeing the others' data."""
  def one(x):
    x = np.asarray(x)
    return jax.make_array_from_process_local_data(batch_sharding(mesh, x.ndim), x)
  return jax.tree_util.tree_map(one, batch)


def bytes_per_device(abstract_tree: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES
                     ) -> dict[str, float]:
  """From shapes alone: total bytes of a (possibly boxed) pytree and the bytes each device
  holds under `mesh` (the largest shard, for uneven trees)."""
  shardings = logical_to_shardings(abstract_tree, mesh, rules)
  leaves = jax.tree_util.tree_leaves(strip_boxes(abstract_tree))
  total = per_device = 0
  for leaf, sharding in zip(leaves, jax.tree_util.tree_leaves(shardings)):
    itemsize = np.dtype(leaf.dtype).itemsize
    total += math.prod(leaf.shape) * itemsize
    per_device += math.prod(sharding.shard_shape(tuple(leaf.shape))) * itemsize
  return {"total_bytes": total, "per_device_bytes": per_device,
          "fraction": per_device / total if total else 0.0}


def _boxed_init(cfg, rng):
  from model.transformer import init_params
  return init_params(cfg, rng, unbox=False)


def abstract_model_params(cfg) -> Any:
  """Boxed abstract parameters (shapes + logical names) of a ModelConfig; nothing allocated."""
  return jax.eval_shape(lambda rng: _boxed_init(cfg, rng), jax.random.key(0))


def param_shardings(cfg, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Any:
  """NamedShardings of the model's parameters (for loading weights or checkpoints sharded)."""
  return logical_to_shardings(abstract_model_params(cfg), mesh, rules)


def init_params_sharded(cfg, rng: jax.Array, mesh: Mesh, rules: Rules = DEFAULT_RULES
                        ) -> tuple[Any, Any]:
  """Model parameters created directly with their shardings. Returns (params, shardings)."""
  return create_sharded(lambda r: _boxed_init(cfg, r), mesh, rules, rng)


def place_params(params: Any, cfg, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Any:
  """Put host / single-device parameters (e.g. loaded from Hugging Face) onto the mesh."""
  return jax.device_put(params, param_shardings(cfg, mesh, rules))
