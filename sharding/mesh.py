"""The device mesh over the axes (data, fsdp, tensor, expert), on one device, one host or many."""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh

from model.errors import UserError
from sharding.rules import MESH_AXES


def resolve_mesh_shape(data: int = 1, fsdp: int = -1, tensor: int = 1,
                       num_devices: int | None = None, expert: int = 1
                       ) -> tuple[int, int, int, int]:
  """Sizes of (data, fsdp, tensor, expert); at most one may be -1, meaning "all remaining
  devices"."""
  num_devices = jax.device_count() if num_devices is None else num_devices
  sizes = [data, fsdp, tensor, expert]
  for name, size in zip(MESH_AXES, sizes):
    if isinstance(size, bool) or not isinstance(size, int) or (size < 1 and size != -1):
      raise UserError(f"Mesh axis {name} must be a positive integer or -1, got {size!r}.")
  words = lambda values: " x ".join(f"{n}={v}" for n, v in zip(MESH_AXES, values)
                                    if n != "expert" or v != 1)
  if sizes.count(-1) > 1:
    raise UserError(f"At most one mesh axis may be -1, got {words(sizes)}.")
  if -1 in sizes:
    known = math.prod(s for s in sizes if s != -1)
    if num_devices % known:
      raise UserError(f"Mesh {words(sizes)}: the fixed axes ({known} devices) do not divide "
                      f"the {num_devices} available devices.")
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise UserError(f"Mesh {words(sizes)} needs {math.prod(sizes)} devices, but {num_devices} "
                    f"are available.")
  return tuple(sizes)


def _granules(devices: Sequence[Any]) -> tuple[str | None, int]:
  """The units joined by the slow network: TPU slices of a multi-slice job (slice_index), or
  the hosts of a multi-process GPU/CPU job (process_index). (None, 1) when there is only one:
  a single TPU slice is one ICI domain however many hosts it has."""
  slices = {getattr(d, "slice_index", 0) for d in devices}
  if len(slices) > 1:
    return "slice_index", len(slices)
  processes = {getattr(d, "process_index", 0) for d in devices}
  if len(processes) > 1 and devices[0].platform != "tpu":
    return "process_index", len(processes)
  return None, 1


def _dcn_shape(shape: tuple[int, ...], granules: int) -> tuple[int, ...]:
  """How many granules (slices / hosts) each mesh axis spans: data first (one gradient
  all-reduce per step), then fsdp (an all-gather per layer), then tensor (several collectives
  per layer: slow across hosts, so only when data x fsdp cannot absorb the hosts; then expert).
  The granules divide the device count, so this always factors them completely."""
  dcn, left = [], granules
  for size in shape:
    dcn.append(math.gcd(size, left))
    left //= dcn[-1]
  return tuple(dcn)


def mesh_devices(shape: tuple[int, ...], devices: Sequence[Any]) -> np.ndarray:
  """The devices arranged as a (data, fsdp, tensor, expert) array with a fast device order.

  `expert` and `tensor` (innermost, the most communication: every token of a sparse layer, the
  activations of every layer) and then `fsdp` stay within a host / ICI domain:
  mesh_utils.create_device_mesh knows TPU and GPU topologies. Several TPU slices (devices with
  several slice_index values) or several GPU/CPU hosts are laid along `data` first, then
  `fsdp` (then `tensor`), with create_hybrid_device_mesh, so the data-centre network carries
  the gradient all-reduce and, only if fsdp spans hosts, the per-layer all-gathers."""
  devices = list(devices)
  attr, granules = _granules(devices)
  if granules > 1:
    dcn = _dcn_shape(shape, granules)
    ici = tuple(s // d for s, d in zip(shape, dcn))
    return mesh_utils.create_hybrid_device_mesh(
        ici, dcn, devices, process_is_granule=attr == "process_index",
        allow_split_physical_axes=True)
  if len(devices) == 1 or devices[0].platform == "cpu":
    return np.asarray(devices).reshape(shape)
  return mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1,
              devices: Sequence[jax.Device] | None = None, expert: int = 1) -> Mesh:
  """A Mesh with axes ("data", "fsdp", "tensor", "expert") over all devices (of every process)
  or `devices`; one size may be -1 for "the rest". See mesh_devices for the device order."""
  devices = list(jax.devices() if devices is None else devices)
  shape = resolve_mesh_shape(data, fsdp, tensor, len(devices), expert)
  return Mesh(mesh_devices(shape, devices), MESH_AXES)


def _field(section: Any, name: str, default: int) -> int:
  get = getattr(section, "get", None)
  value = get(name, default) if get is not None else getattr(section, name, default)
  if isinstance(value, str) and value.strip().lstrip("-").isdigit():
    value = int(value)
  return value


def mesh_from_config(mesh_cfg: Any) -> Mesh:
  """make_mesh from a config section (ConfigDict, dict or object) with fields data, fsdp,
  tensor, expert; missing fields default to data=1, fsdp=-1, tensor=1, expert=1."""
  return make_mesh(data=_field(mesh_cfg, "data", 1), fsdp=_field(mesh_cfg, "fsdp", -1),
                   tensor=_field(mesh_cfg, "tensor", 1), expert=_field(mesh_cfg, "expert", 1))


def is_cpu(mesh: Mesh) -> bool:
  """Whether the mesh is made of CPU devices (where XLA:CPU-specific choices apply)."""
  return mesh.devices.flat[0].platform == "cpu"


def describe(mesh: Mesh) -> str:
  """"data=2 x fsdp=1 x tensor=4 over 8 cpu device(s)" (expert=N only where N > 1)."""
  sizes = " x ".join(f"{name}={mesh.shape[name]}" for name in MESH_AXES
                     if name != "expert" or mesh.shape[name] > 1)
  return f"{sizes} over {mesh.devices.size} {mesh.devices.flat[0].platform} device(s)"
