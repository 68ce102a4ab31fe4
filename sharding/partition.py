"""From logical annotations to NamedShardings, and pytrees created already sharded."""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Any, Callable

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sharding.mesh import is_cpu
from sharding.rules import DEFAULT_RULES, FSDP_AXES, Rules


def _is_box(x: Any) -> bool:
  return isinstance(x, nn.Partitioned)


def strip_boxes(tree: Any) -> Any:
  """Replace nn.Partitioned boxes by their values (no sharding constraint applied)."""
  return jax.tree_util.tree_map(lambda x: x.value if _is_box(x) else x, tree, is_leaf=_is_box)


@contextlib.contextmanager
def activate(mesh: Mesh, rules: Rules = DEFAULT_RULES):
  """Context in which the model's nn.with_logical_constraint calls take effect."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield


def _names(entry: Any) -> tuple[str, ...]:
  if entry is None:
    return ()
  return tuple(entry) if isinstance(entry, tuple) else (entry,)


def _entry(names: list[str]) -> Any:
  return None if not names else (names[0] if len(names) == 1 else tuple(names))


def _split(names: list[str], mesh: Mesh) -> int:
  return math.prod(mesh.shape[name] for name in names)


def fit_spec(spec: PartitionSpec, shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
  """`spec` made valid and minimal for an array of `shape` on `mesh`.

  Mesh axes of size 1 and trailing Nones are left out. A mesh axis that does not divide its
  dimension is dropped (the dimension is then replicated over it, e.g. GPT-2's 50257-row
  embedding on tensor=2), except an FSDP axis: it moves to the dimension with the most elements
  per shard that it divides, so the weight is still stored split (see sharding/rules.py)."""
  entries = tuple(spec) + (None,) * (len(shape) - len(spec))
  kept: list[list[str]] = []
  dropped: list[str] = []
  for dim, entry in zip(shape, entries):
    names: list[str] = []
    for name in _names(entry):
      if mesh.shape[name] == 1:
        continue
      (names if dim % (_split(names, mesh) * mesh.shape[name]) == 0 else dropped).append(name)
    kept.append(names)
  for name in dropped:
    fits = [i for i, names in enumerate(kept)
            if shape[i] % (_split(names, mesh) * mesh.shape[name]) == 0]
    if name in FSDP_AXES and fits:
      kept[max(fits, key=lambda i: shape[i] // _split(kept[i], mesh))].append(name)
  while kept and not kept[-1]:
    kept.pop()
  return PartitionSpec(*(_entry(names) for names in kept))


def logical_to_mesh_specs(abstract_tree: Any, rules: Rules = DEFAULT_RULES) -> Any:
  """The PartitionSpecs (mesh axis names) the rules ask for, before fitting them to shapes;
  unannotated leaves get PartitionSpec(). The returned tree has the unboxed structure."""
  specs = nn.logical_to_mesh(nn.get_partition_spec(abstract_tree), rules)
  return jax.tree_util.tree_map(
      lambda s: s if isinstance(s, PartitionSpec) else PartitionSpec(), specs,
      is_leaf=lambda x: isinstance(x, PartitionSpec) or x is None)


def logical_to_shardings(abstract_tree: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Any:
  """NamedShardings for a pytree whose leaves may be nn.Partitioned (boxed, from eval_shape of an
  init). Unannotated leaves are replicated. The returned tree has the unboxed structure."""
  specs = logical_to_mesh_specs(abstract_tree, rules)
  return jax.tree_util.tree_map(
      lambda spec, leaf: NamedSharding(mesh, fit_spec(spec, tuple(leaf.shape), mesh)),
      specs, strip_boxes(abstract_tree), is_leaf=lambda x: isinstance(x, PartitionSpec))


def abstract_sharded(init_fn: Callable[..., Any], mesh: Mesh, rules: Rules = DEFAULT_RULES,
                     *args) -> Any:
  """jax.ShapeDtypeStructs (with .sharding) of `init_fn(*args)`, unboxed, nothing allocated:
  the target of an orbax restore or of ahead-of-time lowering."""
  with activate(mesh, rules):
    abstract = jax.eval_shape(init_fn, *args)
  shardings = logical_to_shardings(abstract, mesh, rules)
  return jax.tree_util.tree_map(
      lambda leaf, s: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=s),
      strip_boxes(abstract), shardings)


def create_sharded(init_fn: Callable[..., Any], mesh: Mesh, rules: Rules = DEFAULT_RULES,
                   *args) -> tuple[Any, Any]:
  """Run `init_fn(*args)` under jit with out_shardings derived from its logical annotations, so
  every array is born sharded: nothing is first materialised whole on one device.

  `init_fn` may return any pytree with nn.Partitioned leaves, e.g. {"params": boxed params,
  "opt_state": tx.init(boxed params)}: optax maps over the boxes' values and keeps the boxes,
  so each optimizer moment is sharded like its parameter; unboxed leaves (step counters) are
  replicated. Returns (unboxed pytree, its NamedShardings)."""
  with activate(mesh, rules):
    abstract = jax.eval_shape(init_fn, *args)
    shardings = logical_to_shardings(abstract, mesh, rules)
    lowered = jax.jit(lambda *a: nn.unbox(init_fn(*a)), out_shardings=shardings).lower(*args)
  # Runs once: on CPU, compile it without LLVM's optimisations (~1.5 s instead of ~4 s for the
  # quick start's model; the values agree to float32 rounding).
  options = {"xla_backend_optimization_level": 0} if is_cpu(mesh) else None
  values = lowered.compile(options)(*args)
  return values, shardings


def _boxed_init(cfg, rng):
  from model.families import init_params
  return init_params(cfg, rng, unbox=False)


@functools.lru_cache(maxsize=16)
def abstract_model_params(cfg) -> Any:
  """Boxed abstract parameters (shapes + logical names) of a ModelConfig; nothing allocated
  (cached: tracing gpt2-xl's init takes seconds)."""
  return jax.eval_shape(lambda rng: _boxed_init(cfg, rng), jax.random.key(0))


def param_shardings(cfg, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Any:
  """NamedShardings of the model's parameters (for loading weights or checkpoints sharded)."""
  return logical_to_shardings(abstract_model_params(cfg), mesh, rules)


def init_params_sharded(cfg, rng: jax.Array, mesh: Mesh, rules: Rules = DEFAULT_RULES
                        ) -> tuple[Any, Any]:
  """Model parameters created directly with their shardings. Returns (params, shardings)."""
  return create_sharded(lambda r: _boxed_init(cfg, r), mesh, rules, rng)


def params_and_opt_state_init(cfg, tx) -> Callable[[jax.Array], dict]:
  """rng -> {"params": boxed params, "opt_state": tx.init(boxed params)}: the function to give
  create_sharded / abstract_sharded (or to wrap in a TrainState) for a training run."""
  def init_fn(rng):
    params = _boxed_init(cfg, rng)
    return {"params": params, "opt_state": tx.init(params)}
  return init_fn


def init_params_and_opt_state_sharded(cfg, tx, rng: jax.Array, mesh: Mesh,
                                      rules: Rules = DEFAULT_RULES) -> tuple[dict, dict]:
  """{"params", "opt_state"} of an optax transformation, created sharded (optimizer moments
  like their parameters). Returns (state, shardings)."""
  return create_sharded(params_and_opt_state_init(cfg, tx), mesh, rules, rng)


def place_params(params: Any, cfg, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Any:
  """Put host / single-device parameters (e.g. loaded from Hugging Face) onto the mesh."""
  return jax.device_put(params, param_shardings(cfg, mesh, rules))
