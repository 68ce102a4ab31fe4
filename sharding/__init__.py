"""Sharding: device mesh, logical-axis rules, sharded creation, batch placement, reports.

    mesh = make_mesh(data=1, fsdp=-1, tensor=1)            # all devices on fsdp
    rules = make_rules({"embed": None})                      # optional overrides
    params, shardings = init_params_sharded(cfg, rng, mesh, rules)  # born sharded
    with activate(mesh, rules):                              # logical constraints take effect
      logits = jax.jit(fwd)(params, shard_batch(tokens_np, mesh, rules))
    print(format_param_report(cfg, mesh, rules))
"""

from sharding.batch import (batch_axes, batch_sharding, batch_size_multiple, process_batch_indices,
                            process_batch_size, shard_batch)
from sharding.mesh import (describe, is_cpu, make_mesh, mesh_devices, mesh_from_config,
                           resolve_mesh_shape)
from sharding.partition import (abstract_model_params, abstract_sharded, activate,
                                create_sharded, fit_spec, init_params_and_opt_state_sharded,
                                init_params_sharded, logical_to_mesh_specs, logical_to_shardings,
                                param_shardings, params_and_opt_state_init, place_params,
                                strip_boxes)
from sharding.report import ArrayPlacement, bytes_per_device, format_param_report, placements
from sharding.rules import (BATCH_AXES, DEFAULT_RULES, FSDP_AXES, MESH_AXES, format_rules,
                            make_rules, parse_mesh_axes, rules_config, rules_from_config)

__all__ = [
    # mesh
    "describe", "is_cpu", "make_mesh", "mesh_devices", "mesh_from_config", "resolve_mesh_shape",
    # rules
    "BATCH_AXES", "DEFAULT_RULES", "FSDP_AXES", "MESH_AXES", "format_rules", "make_rules",
    "parse_mesh_axes", "rules_config", "rules_from_config",
    # sharded creation
    "abstract_model_params", "abstract_sharded", "activate", "create_sharded", "fit_spec",
    "init_params_and_opt_state_sharded", "init_params_sharded", "logical_to_mesh_specs",
    "logical_to_shardings", "param_shardings", "params_and_opt_state_init", "place_params",
    "strip_boxes",
    # batches
    "batch_axes", "batch_sharding", "batch_size_multiple", "process_batch_indices",
    "process_batch_size", "shard_batch",
    # reports
    "ArrayPlacement", "bytes_per_device", "format_param_report", "placements",
]
