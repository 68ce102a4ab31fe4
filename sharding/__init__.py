"""Sharding: device mesh, logical-axis rules, sharded creation, batch placement.

    mesh = make_mesh(data=1, fsdp=-1, tensor=1)            # all devices on fsdp
    params, shardings = init_params_sharded(cfg, rng, mesh)  # born sharded
    with activate(mesh):                                     # logical constraints take effect
      logits = jax.jit(fwd)(params, shard_batch(tokens_np, mesh))
"""

from sharding.mesh import describe, make_mesh, mesh_from_config, resolve_mesh_shape
from sharding.partition import (abstract_model_params, activate, batch_sharding,
                                batch_size_multiple, bytes_per_device, create_sharded,
                                init_params_sharded, logical_to_shardings, param_shardings,
                                place_params, shard_batch)
from sharding.rules import BATCH_AXES, DEFAULT_RULES, MESH_AXES, make_rules

__all__ = ["describe", "make_mesh", "mesh_from_config", "resolve_mesh_shape",
           "abstract_model_params", "activate", "batch_sharding", "batch_size_multiple",
           "bytes_per_device", "create_sharded", "init_params_sharded", "logical_to_shardings",
           "param_shardings", "place_params", "shard_batch", "BATCH_AXES", "DEFAULT_RULES",
           "MESH_AXES", "make_rules"]
