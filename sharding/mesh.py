"""The device mesh over the axes (data, fsdp, tensor), on one device, one host or many."""

from __future__ import annotations

import math
from typing import Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh

from sharding.rules import MESH_AXES


def resolve_mesh_shape(data: int = 1, fsdp: int = -1, tensor: int = 1,
                       num_devices: int | None = None) -> tuple[int, int, int]:
  """Sizes of (data, fsdp, tensor); at most one may be -1, meaning "all remaining devices"."""
  num_devices = jax.device_count() if num_devices is None else num_devices
  sizes = [data, fsdp, tensor]
  for name, size in zip(MESH_AXES, sizes):
    if isinstance(size, bool) or not isinstance(size, int) or (size < 1 and size != -1):
      raise ValueError(f"Mesh axis {name} must be a positive integer or -1, got {size!r}.")
  if sizes.count(-1) > 1:
    raise ValueError(f"At most one mesh axis may be -1, got data={data}, fsdp={fsdp}, "
                     f"tensor={tensor}.")
  if -1 in sizes:
    known = math.prod(s for s in sizes if s != -1)
    if num_devices % known:
      raise ValueError(f"Mesh data={data} x fsdp={fsdp} x tensor={tensor}: the fixed axes "
                       f"({known} devices) do not divide the {num_devices} available devices.")
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(f"Mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} needs "
                     f"{math.prod(sizes)} devices, but {num_devices} are available.")
  return tuple(sizes)


def _num_slices(devices: Sequence[jax.Device]) -> int:
  return len({getattr(d, "slice_index", 0) for d in devices})


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A Mesh with axes ("data", "fsdp", "tensor").

  Device order keeps `tensor` (innermost, the most communication) and then `fsdp` within a
  host / ICI domain: mesh_utils.create_device_mesh knows TPU and GPU topologies. On a multi-slice
  TPU job (devices with several slice_index values) the slices are laid along `data` with
  create_hybrid_device_mesh, so only gradient all-reduces cross the data-centre network.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = resolve_mesh_shape(data, fsdp, tensor, len(devices))
  slices = _num_slices(devices)
  if slices > 1 and shape[0] % slices == 0:
    ici_shape = (shape[0] // slices, shape[1], shape[2])
    device_array = mesh_utils.create_hybrid_device_mesh(
        ici_shape, (slices, 1, 1), devices, allow_split_physical_axes=True)
  elif len(devices) == 1 or devices[0].platform == "cpu":
    device_array = np.asarray(devices).reshape(shape)
  else:
    device_array = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
  return Mesh(device_array, MESH_AXES)


def mesh_from_config(mesh_cfg) -> Mesh:
  """make_mesh from a config section with fields data, fsdp, tensor."""
  return make_mesh(data=int(mesh_cfg.data), fsdp=int(mesh_cfg.fsdp), tensor=int(mesh_cfg.tensor))


def describe(mesh: Mesh) -> str:
  sizes = " x ".join(f"{name}={mesh.shape[name]}" for name in MESH_AXES)
  return f"{sizes} over {mesh.devices.size} {mesh.devices.flat[0].platform} device(s)"
