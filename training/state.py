"""TrainState: everything a training step changes, as one pytree born sharded."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from model.config import ModelConfig
from model.transformer import init_params
from sharding import DEFAULT_RULES, create_sharded


class TrainState(flax.struct.PyTreeNode):
  """step: int32 number of updates done; params: float32 (param_dtype) parameters;
  opt_state: the optax state (moments follow their parameter's sharding); rng: uint32 key
  data (jax.random.key_data) from which the dropout key of step s is fold_in(rng, s)."""
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array


def init_state_fn(cfg: ModelConfig, tx: optax.GradientTransformation):
  """seed key -> TrainState whose parameters and moments are nn.Partitioned-boxed (logical axis
  names), for `sharding.create_sharded`."""
  def init(key):
    params_key, train_key = jax.random.split(key)
    params = init_params(cfg, params_key, unbox=False)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      rng=jax.random.key_data(train_key))
  return init


def create_train_state(cfg: ModelConfig, tx: optax.GradientTransformation, mesh: Mesh,
                       seed: int, rules=DEFAULT_RULES) -> tuple[TrainState, TrainState]:
  """A fresh TrainState created directly with its shardings. Returns (state, shardings)."""
  return create_sharded(init_state_fn(cfg, tx), mesh, rules, jax.random.key(seed))


def abstract_train_state(cfg: ModelConfig, tx: optax.GradientTransformation, mesh: Mesh,
                         rules=DEFAULT_RULES) -> tuple[TrainState, TrainState]:
  """(ShapeDtypeStructs carrying their shardings, shardings) of the TrainState, nothing
  allocated: the target for restoring a checkpoint onto `mesh`."""
  from sharding import activate, logical_to_shardings
  init = init_state_fn(cfg, tx)
  key = jax.random.key(0)  # outside the mesh context: the mesh may be of compile-only devices
  with activate(mesh, rules):
    boxed = jax.eval_shape(init, key)
    shardings = logical_to_shardings(boxed, mesh, rules)
  shapes = jax.tree_util.tree_map(
      lambda x: x.value if hasattr(x, "unbox") else x, boxed,
      is_leaf=lambda x: hasattr(x, "unbox"))
  abstract = jax.tree_util.tree_map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)
  return abstract, shardings
