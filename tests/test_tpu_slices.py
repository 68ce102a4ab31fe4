"""training/tpu/slices.py: the one table of TPU slices that launch.tpu and launch.aot share:
names -> chips, hosts, ICI grids, HBM, peak FLOP/s and runtime versions; bad names in one
sentence."""

import pytest

from model.errors import UserError
from training.tpu import gcloud
from training.tpu.slices import GIB, parse_slice


@pytest.mark.parametrize("name,topology_name,chips,hosts", [
    ("v5p-8", "v5p:2x2x1", 4, 1), ("v5p-16", "v5p:2x2x2", 8, 2), ("v5p-32", "v5p:2x2x4", 16, 4),
    ("v5p-64", "v5p:2x4x4", 32, 8), ("v5p-128", "v5p:4x4x4", 64, 16),
    ("v5p-256", "v5p:4x4x8", 128, 32), ("v5p-384", "v5p:4x4x12", 192, 48),
    ("v5p-512", "v5p:4x8x8", 256, 64), ("v5p-640", "v5p:4x4x20", 320, 80),
    ("v5p-768", "v5p:4x8x12", 384, 96), ("v5p-1024", "v5p:8x8x8", 512, 128),
    ("v5p-1152", "v5p:4x12x12", 576, 144), ("v5p-2048", "v5p:8x8x16", 1024, 256),
    ("v5p-2560", "v5p:8x8x20", 1280, 320), ("v5p-3072", "v5p:8x12x16", 1536, 384),
    ("v4-8", "v4:2x2x1", 4, 1), ("v4-32", "v4:2x2x4", 16, 4), ("v4-4096", "v4:8x16x16", 2048, 512),
    ("v5e-1", "v5e:1x1", 1, 1), ("v5e-4", "v5e:2x2", 4, 1), ("v5e-8", "v5e:2x4", 8, 1),
    ("v5e-16", "v5e:4x4", 16, 4), ("v5litepod-128", "v5e:8x16", 128, 32),
    ("v5e-256", "v5e:16x16", 256, 64), ("v6e-8", "v6e:2x4", 8, 1), ("v6e-64", "v6e:8x8", 64, 16),
    ("v6e-256", "v6e:16x16", 256, 64), ("v5p:4x4x12", "v5p:4x4x12", 192, 48),
    ("v5litepod:4x8", "v5e:4x8", 32, 8),
])
def test_slice_names_map_to_topologies(name, topology_name, chips, hosts):
  topo = parse_slice(name)
  assert (topo.topology_name, topo.chips, topo.hosts) == (topology_name, chips, hosts)


@pytest.mark.parametrize("name", ["v4-8", "v4-64", "v5p-8", "v5p-64", "v5p-512", "v5e-1",
                                  "v5e-8", "v5e-16", "v5e-256", "v6e-4", "v6e-32"])
def test_chips_and_hosts_agree_with_the_tpu_launcher(name):
  gcloud_name = name.replace("v5e-", "v5litepod-")
  shape = gcloud.parse_accelerator_type(gcloud_name)
  topo = parse_slice(name)
  assert (topo.chips, topo.hosts, topo.accelerator_type) == (shape.chips, shape.hosts,
                                                             gcloud_name)
  assert gcloud.parse_accelerator_type(name) == parse_slice(name, "--accelerator_type")


def test_wraparound_and_host_bounds():
  assert parse_slice("v5p-64").wrap == (False, False, False)
  assert parse_slice("v5p-128").wrap == (True, True, True)
  assert parse_slice("v5e-128").wrap == (False, True, False)
  assert parse_slice("v6e-256").wrap == (True, True, False)
  assert parse_slice("v5e-8").chips_per_host_bounds == (2, 4, 1)
  assert parse_slice("v5e-16").chips_per_host_bounds == (2, 2, 1)
  assert parse_slice("v4-8").chips_per_host_bounds == (2, 2, 1)


def test_chip_properties_come_from_the_tables():
  v5p, v5e = parse_slice("v5p-8"), parse_slice("v5e-4")
  assert v5p.hbm_bytes == 95 * GIB and v5e.hbm_bytes == 16 * GIB
  assert v5p.peak_flops_per_chip == 459e12 and v5e.peak_flops_per_chip == 197e12
  assert parse_slice("v4-8").peak_flops_per_chip == 275e12
  assert parse_slice("v6e-4").peak_flops_per_chip == 918e12


@pytest.mark.parametrize("name,words", [
    ("v5p-7", "TensorCores"), ("v5p-24", "TensorCores"), ("v5p-96", "multiple of 128"),
    ("v5e-2", "chips"), ("v6e-512", "chips"), ("v3-8", "Unknown --topology"),
    ("", "Unknown --topology"), ("v5p:4x4", "3 positive sizes"), ("tpu", "Unknown --topology"),
])
def test_bad_slice_names_are_one_sentence(name, words):
  with pytest.raises(UserError, match=words) as e:
    parse_slice(name)
  assert "\n" not in str(e.value)


@pytest.mark.parametrize("accelerator_type,chips,hosts", [
    ("v4-8", 4, 1), ("v4-16", 8, 2), ("v4-32", 16, 4), ("v4-128", 64, 16),
    ("v5p-8", 4, 1), ("v5p-16", 8, 2), ("v5p-64", 32, 8), ("v5p-1024", 512, 128),
    ("v5litepod-1", 1, 1), ("v5litepod-4", 4, 1), ("v5litepod-8", 8, 1),
    ("v5litepod-16", 16, 4), ("v5litepod-256", 256, 64),
    ("v6e-1", 1, 1), ("v6e-8", 8, 1), ("v6e-16", 16, 4), ("v6e-64", 64, 16), ("v6e-256", 256, 64),
])
def test_chips_and_hosts_per_slice(accelerator_type, chips, hosts):
  shape = gcloud.parse_accelerator_type(accelerator_type)
  assert (shape.chips, shape.hosts) == (chips, hosts)
  assert gcloud.hosts_per_slice(accelerator_type) == hosts


@pytest.mark.parametrize("accelerator_type,runtime", [
    ("v4-32", "tpu-ubuntu2204-base"), ("v5p-64", "v2-alpha-tpuv5"),
    ("v5litepod-16", "v2-alpha-tpuv5-lite"), ("v6e-64", "v2-alpha-tpuv6e"),
])
def test_default_runtime_version_per_generation(accelerator_type, runtime):
  assert gcloud.default_runtime_version(accelerator_type) == runtime


@pytest.mark.parametrize("bad", ["v3-8", "v5p-12", "v5p-24", "v4-0", "v6e-12", "v5litepod-2",
                                 "tpu-v5p-8", "V5P-8", "v5p", ""])
def test_unknown_accelerator_types_are_refused(bad):
  with pytest.raises(UserError, match="accelerator_type"):
    gcloud.parse_accelerator_type(bad)


def test_v5e_names_become_the_gcloud_spelling():
  """v5e-N is accepted everywhere (launch.aot always took it) and gcloud gets v5litepod-N."""
  assert gcloud.parse_accelerator_type("v5e-16").accelerator_type == "v5litepod-16"
  assert gcloud.hosts_per_slice("v5e-16") == gcloud.hosts_per_slice("v5litepod-16") == 4
