"""Content fingerprints of the arrays of a checkpoint: saved in its metadata, checked at restore.

The fingerprint of an array is two wrapping uint32 sums over its bits viewed as 32-bit words
(2- and 1-byte elements widened, 8-byte ones split): the plain sum of the words and the sum of
word x (2 x flat index + 1), the second catching moved or swapped words. Integer addition mod
2**32 is associative and commutative, so the sums are exact whatever the order of reduction:
the same on any mesh and sharding, computed on the devices where the array lives (one jitted
pass over the state, no array leaves the devices), so a run resumed on another mesh checks too.

    fp = fingerprints(state)               # {"params/wte/embedding": [sum, weighted sum], ...}
    bad = mismatches(restored, fp)         # names whose content differs from what was saved
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec

Fingerprints = dict[str, list[int]]


def leaf_name(path) -> str:
  """A key path as "params/wte/embedding" (the same for a TrainState and a {"params": ...}
  dict)."""
  parts = []
  for k in path:
    for attr in ("name", "key", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return "/".join(parts)


def _words(x: jax.Array) -> jax.Array:
  """The bits of x as uint32 words (shape of x, plus a trailing 2 for 8-byte elements)."""
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  size = jnp.dtype(x.dtype).itemsize
  if size == 4:
    return lax.bitcast_convert_type(x, jnp.uint32)
  if size in (1, 2):
    narrow = jnp.uint8 if size == 1 else jnp.uint16
    return lax.bitcast_convert_type(x, narrow).astype(jnp.uint32)
  if size == 8:
    return lax.bitcast_convert_type(x, jnp.uint32)
  raise TypeError(f"no fingerprint for dtype {x.dtype}")


def _fingerprint(x: jax.Array) -> jax.Array:
  w = _words(x)
  # The flat (row-major) index of each word from one iota per dimension: no reshape, so the
  # array keeps its sharding and every device sums its own shard.
  index = jnp.zeros(w.shape, jnp.uint32)
  stride = 1
  for dim in reversed(range(w.ndim)):
    index = index + lax.broadcasted_iota(jnp.uint32, w.shape, dim) * jnp.uint32(stride % 2**32)
    stride *= w.shape[dim]
  weights = index * jnp.uint32(2) + jnp.uint32(1)
  return jnp.stack([jnp.sum(w, dtype=jnp.uint32), jnp.sum(w * weights, dtype=jnp.uint32)])


@functools.lru_cache(maxsize=8)
def _compiled(mesh):
  out = NamedSharding(mesh, PartitionSpec()) if mesh is not None else None
  return jax.jit(lambda leaves: [_fingerprint(x) for x in leaves], out_shardings=out)


def fingerprints(tree: Any) -> Fingerprints:
  """{leaf name: [sum, weighted sum]} of every array in `tree` (a collective on several
  processes: call it on all of them)."""
  named, _ = jax.tree_util.tree_flatten_with_path(tree)
  names = [leaf_name(p) for p, _ in named]
  leaves = [x for _, x in named]
  mesh = next((x.sharding.mesh for x in leaves
               if isinstance(getattr(x, "sharding", None), NamedSharding)), None)
  sums = _compiled(mesh)(leaves)
  # Replicated outputs: every process holds the whole (2,) result.
  host = [np.asarray(s.addressable_data(0)) for s in sums]
  return {n: [int(v) for v in h] for n, h in zip(names, host)}


def mismatches(tree: Any, expected: Fingerprints) -> list[str]:
  """The names of the arrays of `tree` whose fingerprint differs from `expected` (arrays
  `expected` does not name are not checked)."""
  got = fingerprints(tree)
  return [n for n, fp in got.items() if n in expected and list(expected[n]) != fp]
