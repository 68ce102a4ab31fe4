"""TPU slices by name (v5p-64, v5e-256, ...) and their compile-only devices, from libtpu.

    topo = parse_topology("v5p-64")    # Topology(generation="v5p", grid=(2, 4, 4)): 32 chips
    devices = topology_devices(topo)   # 32 devices that XLA can compile for, not run on

v4-N and v5p-N count TensorCores; each chip has two, which JAX drives as one "megacore" device:
v5p-64 = 32 chips = "v5p:2x4x4". Up to 32 chips a slice is 2x2x1, 2x2x2, 2x2x4 or 2x4x4; larger
ones are made of 4x4x4-chip cubes, as close to a cube as possible (v5p-512 = "v5p:4x8x8"), with
wraparound links. v5e-N (= v5litepod-N) and v6e-N count chips: v5e-256 = "v5e:16x16". An
explicit grid such as "v5p:4x4x12" is accepted too. The chip, host and slice counts agree with
training/tpu_commands.py (the gcloud side); the grids with MaxText's accelerator_to_spec_map.

The devices come from jax.experimental.topologies.get_topology_desc, which needs libtpu
(`pip install "jax[tpu]"`), also on a machine without TPUs.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re

import jax

from training import flops
from training.errors import UserError

GIB = 1024 ** 3
HBM_GIB = {"v4": 32, "v5e": 16, "v5p": 95, "v6e": 32}  # per chip, nominal
MEGACORE = ("v4", "v5p")  # names count TensorCores, two per chip
_ALIASES = {"v5litepod": "v5e"}
_NAME_RE = re.compile(r"^(v4|v5p|v5e|v5litepod|v6e)-(\d+)$")
_GRID_RE = re.compile(r"^(v4|v5p|v5e|v5litepod|v6e):(\d+(?:x\d+)*)$")
_SMALL_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4)}
_GRID_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16),
            256: (16, 16)}


@dataclasses.dataclass(frozen=True)
class Topology:
  """A TPU slice: its generation and chips along each axis of its ICI grid."""
  name: str  # as asked for, e.g. "v5p-64"
  generation: str  # v4 | v5p | v5e | v6e
  grid: tuple[int, ...]  # (2, 4, 4)

  @property
  def chips(self) -> int:
    return math.prod(self.grid)

  @property
  def accelerator_type(self) -> str:
    """The gcloud name: v5p-64 (TensorCores), v5litepod-16, v6e-16 (chips)."""
    if self.generation in MEGACORE:
      return f"{self.generation}-{2 * self.chips}"
    return f"{'v5litepod' if self.generation == 'v5e' else self.generation}-{self.chips}"

  @property
  def topology_name(self) -> str:
    """The name get_topology_desc takes: "v5p:2x4x4"."""
    return f"{self.generation}:{'x'.join(map(str, self.grid))}"

  @property
  def chips_per_host_bounds(self) -> tuple[int, int, int]:
    """Chips of one TPU VM along each axis: 4 (2x2), or the whole slice up to 8 chips of v5e
    and v6e (their 1-, 4- and 8-chip VMs)."""
    if self.generation not in MEGACORE and self.chips <= 8:
      return tuple(self.grid) + (1,)
    return (2, 2, 1)

  @property
  def hosts(self) -> int:
    return self.chips // math.prod(self.chips_per_host_bounds)

  @property
  def wrap(self) -> tuple[bool, bool, bool]:
    """Wraparound (torus) links: v4/v5p slices of whole 4x4x4 cubes; v5e/v6e axes of 16."""
    if self.generation in MEGACORE:
      return (self.chips >= 64 and all(n % 4 == 0 for n in self.grid),) * 3
    return tuple(n == 16 for n in self.grid) + (False,)

  @property
  def hbm_bytes(self) -> int:
    return HBM_GIB[self.generation] * GIB

  @property
  def peak_flops_per_chip(self) -> float:
    return flops.PEAK_BF16_TFLOPS[f"tpu {self.generation}"] * 1e12


def _cube_grid(chips: int) -> tuple[int, int, int]:
  """A multiple of 64 chips as 4x4x4 cubes, as close to a cube as possible (smallest longest
  side, then largest shortest side): 128 -> 4x4x8, 384 -> 4x8x12, 512 -> 8x8x8."""
  cubes = chips // 64
  shapes = [(a, b, cubes // (a * b)) for a in range(1, cubes + 1) for b in range(a, cubes + 1)
            if cubes % (a * b) == 0 and cubes // (a * b) >= b]
  a, b, c = min(shapes, key=lambda s: (s[2], -s[0]))
  return (4 * a, 4 * b, 4 * c)


def _grid(generation: str, n: int, name: str) -> tuple[int, ...]:
  if generation in MEGACORE:
    chips = n // 2 if n % 2 == 0 else 0
    if chips in _SMALL_3D:
      return _SMALL_3D[chips]
    if chips >= 64 and chips % 64 == 0:
      return _cube_grid(chips)
    raise UserError(f"--topology {name!r} is not a {generation} slice size: {generation}-N counts "
                    f"TensorCores, 8, 16, 32, 64 or a multiple of 128 ({generation}-128, "
                    f"{generation}-256, ...).")
  if n in _GRID_2D:
    return _GRID_2D[n]
  raise UserError(f"--topology {name!r} is not a {generation} slice size: {generation}-N counts "
                  f"chips, one of {', '.join(map(str, _GRID_2D))}.")


def parse_topology(name: str) -> Topology:
  """"v5p-64" / "v5e-256" / "v5litepod-16" / "v6e-8" / "v4-32" / "v5p:4x4x12" -> Topology;
  raises UserError for anything else."""
  name = (name or "").strip()
  match = _NAME_RE.match(name)
  if match:
    generation = _ALIASES.get(match.group(1), match.group(1))
    return Topology(name, generation, _grid(generation, int(match.group(2)), name))
  match = _GRID_RE.match(name)
  if match:
    generation = _ALIASES.get(match.group(1), match.group(1))
    grid = tuple(int(n) for n in match.group(2).split("x"))
    dims = 3 if generation in MEGACORE else 2
    if len(grid) != dims or min(grid) < 1:
      raise UserError(f"--topology {name!r}: a {generation} grid has {dims} positive sizes, "
                      f"e.g. {generation}:{'x'.join(['4'] * dims)}.")
    return Topology(name, generation, grid)
  raise UserError(f"Unknown --topology {name!r}: expected v4-N, v5p-N, v5e-N (or v5litepod-N), "
                  f"v6e-N, e.g. v5p-64, or a chip grid such as v5p:4x4x8.")


def libtpu_available() -> bool:
  return importlib.util.find_spec("libtpu") is not None


def check_libtpu() -> None:
  if not libtpu_available():
    raise UserError(f"Compiling for a TPU slice needs libtpu, which is not installed here: "
                    f"pip install \"jax[tpu]=={jax.__version__}\" (a separate virtual environment "
                    f"is best; it works on a CPU-only machine).")


def _quiet_libtpu(topo: Topology) -> None:
  """Without these libtpu looks for a TPU VM's metadata and prints warnings (values already
  set, e.g. on a real TPU VM, are kept)."""
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", topo.accelerator_type)
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")


def topology_devices(topo: Topology, num_slices: int = 1) -> list:
  """Compile-only devices of `num_slices` such slices (one device per chip)."""
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  check_libtpu()
  _quiet_libtpu(topo)
  try:
    desc = topologies.get_topology_desc(
        topology_name=topo.topology_name, platform="tpu",
        chip_config_name="megacore" if topo.generation in MEGACORE else "default",
        chips_per_host_bounds=topo.chips_per_host_bounds, num_slices=num_slices,
        wrap=topo.wrap)
  except RuntimeError as e:
    raise UserError(f"libtpu does not accept --topology {topo.name!r} ({topo.topology_name}): "
                    f"{str(e).splitlines()[0]}") from None
  return list(desc.devices)
