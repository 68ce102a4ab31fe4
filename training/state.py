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
from training.adapters import trainable_params


class TrainState(flax.struct.PyTreeNode):
  """step: int32 number of updates done; params: float32 (param_dtype) parameters (a LoRA
  model's base and adapters); opt_state: the optax state of the trainable parameters (all of
  them, or a LoRA model's adapters: training/adapters.py), moments sharded like their
  parameter; rng: uint32 key data (jax.random.key_data) from which the dropout key of step s
  is fold_in(rng, s)."""
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
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=tx.init(trainable_params(cfg, params)),
                      rng=jax.random.key_data(train_key))
  return init


def new_adapters(cfg: ModelConfig, seed: int) -> Any:
  """A LoRA model's freshly initialised adapters (host arrays), the ones a new run from `seed`
  gets (create_train_state's); the base's initialisation is never computed."""
  def init(key):
    return trainable_params(cfg, init_params(cfg, jax.random.split(key)[0]))
  return jax.device_get(jax.jit(init)(jax.random.key(seed)))


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


def place(params: Any, abstract: Any) -> Any:
  """Host arrays (every process passes the same) on the shardings of `abstract`
  (ShapeDtypeStructs with shardings), each device given only its shard."""
  def put(x, a):
    if tuple(x.shape) != tuple(a.shape) or x.dtype != a.dtype:
      raise ValueError(f"parameter of shape {x.shape} {x.dtype}, expected {a.shape} {a.dtype}")
    return jax.make_array_from_callback(a.shape, a.sharding, lambda index: x[index])
  return jax.tree_util.tree_map(put, params, abstract)


def train_state_from_params(params: Any, tx: optax.GradientTransformation,
                            abstract: TrainState, seed: int,
                            cfg: ModelConfig | None = None) -> TrainState:
  """A TrainState at step 0 holding `params` (host arrays shaped like abstract.params; every
  process passes the same), a fresh optimizer state (of cfg's trainable parameters: a LoRA
  model's adapters) and the RNG a new run from `seed` gets; every array with the sharding of
  its `abstract` (abstract_train_state) counterpart."""
  placed = place(params, abstract.params)

  def init(p):
    _, train_key = jax.random.split(jax.random.key(seed))
    trainable = p if cfg is None else trainable_params(cfg, p)
    return TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(trainable),
                      rng=jax.random.key_data(train_key))

  shardings = jax.tree_util.tree_map(lambda x: x.sharding, abstract)
  return jax.jit(init, out_shardings=shardings)(placed)
