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
