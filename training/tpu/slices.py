"""TPU slices: one table of the chips (HBM, peak FLOP/s, software version) and one parser of
slice names, used by `launch.tpu` (gcloud) and `launch.aot` (compiling for a slice) alike.

    s = parse_slice("v5p-64")   # TpuSlice: 32 chips on 8 hosts, grid 2x4x4 ("v5p:2x4x4")
    s.accelerator_type          # "v5p-64", the name gcloud takes
    devices = topology_devices(s)   # 32 devices XLA can compile for (libtpu), not run on

Names: v4-N and v5p-N count TensorCores; each chip has two, which JAX drives as one "megacore"
device, so v5p-64 = 32 chips. Up to 32 chips a slice is 2x2x1, 2x2x2, 2x2x4 or 2x4x4; larger
ones are whole 4x4x4-chip cubes, as close to a cube as possible (v5p-512 = 4x8x8), with
wraparound links (https://cloud.google.com/tpu/docs/v5p: v5p-8, -16, -32, -64, -128, -256, ...;
v4 alike). v5e-N (gcloud: v5litepod-N) and v6e-N count chips: 1, 4, 8, 16, ..., 256; slices of
up to 8 chips are one TPU VM, larger ones 4-chip VMs (https://cloud.google.com/tpu/docs/v5e,
.../v6e). A chip grid such as "v5p:4x4x12" names a slice too. The grids agree with MaxText's
accelerator_to_spec_map.

Chip facts per generation (vendor pages; HBM is what JAX can allocate): v4 32 GiB, 275 TFLOP/s
bf16; v5e 16 GiB, 197; v5p 95 GiB, 459; v6e 32 GiB, 918. Default TPU software versions for JAX
(https://cloud.google.com/tpu/docs/runtimes): v4 tpu-ubuntu2204-base, v5e v2-alpha-tpuv5-lite,
v5p v2-alpha-tpuv5, v6e v2-alpha-tpuv6e.

Compile-only devices come from jax.experimental.topologies.get_topology_desc, which needs libtpu
(`pip install "jax[tpu]"`), also on a machine without TPUs. jax is imported only for them, so the
gcloud side (training/tpu/gcloud.py) runs without it.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re

from model.errors import UserError

GIB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Generation:
  """One TPU generation: its chips and how its slices are named."""
  name: str               # v4 | v5p | v5e | v6e (jax's device_kind says "TPU v5p", ...)
  gcloud_prefix: str      # the accelerator-type prefix gcloud takes: v5litepod for v5e
  counts_cores: bool      # NAME-N counts TensorCores (2 per chip, one JAX "megacore" device)
  hbm_gib: int            # per chip
  peak_bf16_tflops: float  # dense, per chip
  runtime: str            # default --version / --runtime-version

  @property
  def grid_dims(self) -> int:
    return 3 if self.counts_cores else 2


GENERATIONS = {g.name: g for g in (
    Generation("v4", "v4", True, 32, 275.0, "tpu-ubuntu2204-base"),
    Generation("v5p", "v5p", True, 95, 459.0, "v2-alpha-tpuv5"),
    Generation("v5e", "v5litepod", False, 16, 197.0, "v2-alpha-tpuv5-lite"),
    Generation("v6e", "v6e", False, 32, 918.0, "v2-alpha-tpuv6e"),
)}
_ALIASES = {"v5litepod": "v5e"}
_NAME_RE = re.compile(r"^(v4|v5p|v5e|v5litepod|v6e)-(\d+)$")
_GRID_RE = re.compile(r"^(v4|v5p|v5e|v5litepod|v6e):(\d+(?:x\d+)*)$")
_SMALL_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4)}
_GRID_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16),
            256: (16, 16)}


@dataclasses.dataclass(frozen=True)
class TpuSlice:
  """A TPU slice: its generation and chips along each axis of its ICI grid."""
  name: str  # as asked for, e.g. "v5p-64" or "v5e-16"
  generation: Generation
  grid: tuple[int, ...]  # (2, 4, 4)

  @property
  def chips(self) -> int:
    return math.prod(self.grid)

  @property
  def accelerator_type(self) -> str:
    """The gcloud name: v5p-64 (TensorCores), v5litepod-16, v6e-16 (chips)."""
    n = 2 * self.chips if self.generation.counts_cores else self.chips
    return f"{self.generation.gcloud_prefix}-{n}"

  @property
  def topology_name(self) -> str:
    """The name get_topology_desc takes: "v5p:2x4x4"."""
    return f"{self.generation.name}:{'x'.join(map(str, self.grid))}"

  @property
  def chips_per_host_bounds(self) -> tuple[int, int, int]:
    """Chips of one TPU VM along each axis: 4 (2x2), or the whole slice up to 8 chips of v5e
    and v6e (their 1-, 4- and 8-chip VMs)."""
    if not self.generation.counts_cores and self.chips <= 8:
      return tuple(self.grid) + (1,)
    return (2, 2, 1)

  @property
  def hosts(self) -> int:
    """TPU VMs (gcloud workers, JAX processes) in the slice."""
    return self.chips // math.prod(self.chips_per_host_bounds)

  @property
  def wrap(self) -> tuple[bool, bool, bool]:
    """Wraparound (torus) links: v4/v5p slices of whole 4x4x4 cubes; v5e/v6e axes of 16."""
    if self.generation.counts_cores:
      return (self.chips >= 64 and all(n % 4 == 0 for n in self.grid),) * 3
    return tuple(n == 16 for n in self.grid) + (False,)

  @property
  def hbm_bytes(self) -> int:
    return self.generation.hbm_gib * GIB

  @property
  def peak_flops_per_chip(self) -> float:
    return self.generation.peak_bf16_tflops * 1e12

  def describe(self) -> str:
    """"v5p-64: 32 chips (TPU v5p, 2x4x4) on 8 hosts"."""
    hosts = f"{self.hosts} host" + ("" if self.hosts == 1 else "s")
    return (f"{self.name}: {self.chips} chips (TPU {self.generation.name}, "
            f"{'x'.join(map(str, self.grid))}) on {hosts}")


def _cube_grid(chips: int) -> tuple[int, int, int]:
  """A multiple of 64 chips as 4x4x4 cubes, as close to a cube as possible (smallest longest
  side, then largest shortest side): 128 -> 4x4x8, 384 -> 4x8x12, 512 -> 8x8x8."""
  cubes = chips // 64
  shapes = [(a, b, cubes // (a * b)) for a in range(1, cubes + 1) for b in range(a, cubes + 1)
            if cubes % (a * b) == 0 and cubes // (a * b) >= b]
  a, b, c = min(shapes, key=lambda s: (s[2], -s[0]))
  return (4 * a, 4 * b, 4 * c)


def _grid(gen: Generation, n: int, name: str, flag: str) -> tuple[int, ...]:
  if gen.counts_cores:
    chips = n // 2 if n % 2 == 0 else 0
    if chips in _SMALL_3D:
      return _SMALL_3D[chips]
    if chips >= 64 and chips % 64 == 0:
      return _cube_grid(chips)
    raise UserError(f"{flag} {name!r} is not a {gen.name} slice size: {gen.name}-N counts "
                    f"TensorCores, 8, 16, 32, 64 or a multiple of 128 ({gen.name}-128, "
                    f"{gen.name}-256, ...).")
  if n in _GRID_2D:
    return _GRID_2D[n]
  raise UserError(f"{flag} {name!r} is not a {gen.name} slice size: {gen.name}-N counts "
                  f"chips, one of {', '.join(map(str, _GRID_2D))}.")


def parse_slice(name: str, flag: str = "--topology") -> TpuSlice:
  """"v5p-64" / "v5e-256" / "v5litepod-16" / "v6e-8" / "v4-32" / "v5p:4x4x12" -> TpuSlice;
  anything else raises UserError, naming `flag`."""
  name = (name or "").strip()
  match = _NAME_RE.match(name)
  if match:
    gen = GENERATIONS[_ALIASES.get(match.group(1), match.group(1))]
    return TpuSlice(name, gen, _grid(gen, int(match.group(2)), name, flag))
  match = _GRID_RE.match(name)
  if match:
    gen = GENERATIONS[_ALIASES.get(match.group(1), match.group(1))]
    grid = tuple(int(n) for n in match.group(2).split("x"))
    if len(grid) != gen.grid_dims or min(grid) < 1:
      raise UserError(f"{flag} {name!r}: a {gen.name} grid has {gen.grid_dims} positive sizes, "
                      f"e.g. {gen.name}:{'x'.join(['4'] * gen.grid_dims)}.")
    return TpuSlice(name, gen, grid)
  raise UserError(f"Unknown {flag} {name!r}: expected v4-N, v5p-N, v5e-N (or v5litepod-N), "
                  f"v6e-N, e.g. v5p-64, or a chip grid such as v5p:4x4x8.")


# ---------------------------------------------------------------------------------------------
# Compile-only devices (libtpu)


def libtpu_available() -> bool:
  return importlib.util.find_spec("libtpu") is not None


def check_libtpu() -> None:
  import jax  # pylint: disable=import-outside-toplevel  (the gcloud launcher needs no jax)
  if not libtpu_available():
    raise UserError(f"Compiling for a TPU slice needs libtpu, which is not installed here: "
                    f"pip install \"jax[tpu]=={jax.__version__}\" (a separate virtual environment "
                    f"is best; it works on a CPU-only machine).")


def _quiet_libtpu(tpu: TpuSlice) -> None:
  """Without these libtpu looks for a TPU VM's metadata and prints warnings (values already
  set, e.g. on a real TPU VM, are kept)."""
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", tpu.accelerator_type)
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")


def topology_devices(tpu: TpuSlice, num_slices: int = 1) -> list:
  """Compile-only devices of `num_slices` such slices (one device per chip)."""
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  check_libtpu()
  _quiet_libtpu(tpu)
  try:
    desc = topologies.get_topology_desc(
        topology_name=tpu.topology_name, platform="tpu",
        chip_config_name="megacore" if tpu.generation.counts_cores else "default",
        chips_per_host_bounds=tpu.chips_per_host_bounds, num_slices=num_slices,
        wrap=tpu.wrap)
  except RuntimeError as e:
    raise UserError(f"libtpu does not accept --topology {tpu.name!r} ({tpu.topology_name}): "
                    f"{str(e).splitlines()[0]}") from None
  return list(desc.devices)
