"""TrainState: everything a training step changes, as one pytree born sharded."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from model.config import ModelConfig
from model.families import init_params
from sharding import DEFAULT_RULES, abstract_sharded, create_sharded


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
  allocated: the target for restoring a checkpoint onto `mesh` or for AOT lowering."""
  abstract = abstract_sharded(init_state_fn(cfg, tx), mesh, rules, jax.random.key(0))
  return abstract, jax.tree_util.tree_map(lambda x: x.sharding, abstract)


def train_state_from_params(params: Any, tx: optax.GradientTransformation,
                            abstract: TrainState, seed: int) -> TrainState:
  """A TrainState at step 0 holding `params` (host arrays shaped like abstract.params; every
  process passes the same), a fresh optimizer state and the RNG a new run from `seed` gets;
  every array with the sharding of its `abstract` (abstract_train_state) counterpart."""
  def place(x, a):
    if tuple(x.shape) != tuple(a.shape) or x.dtype != a.dtype:
      raise ValueError(f"parameter of shape {x.shape} {x.dtype}, expected {a.shape} {a.dtype}")
    return jax.make_array_from_callback(a.shape, a.sharding, lambda index: x[index])

  placed = jax.tree_util.tree_map(place, params, abstract.params)

  def init(p):
    _, train_key = jax.random.split(jax.random.key(seed))
    return TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p),
                      rng=jax.random.key_data(train_key))

  shardings = jax.tree_util.tree_map(lambda x: x.sharding, abstract)
  return jax.jit(init, out_shardings=shardings)(placed)
