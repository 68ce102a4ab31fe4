"""Test setup: 8 fake CPU devices (so every sharding path runs), and what several test files
share: the packaged data files, a tiny training run's pieces, and helpers."""

import json
import os
import pathlib
import subprocess
import sys

# 8 fake CPU devices; LLVM optimisation off makes XLA:CPU compiles ~3x faster (tiny models run
# fast either way, and results do not depend on it).
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8"
                           " --xla_backend_optimization_level=0").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# gcsfs's newest layer first asks a gRPC control plane that the GCS emulator (fixture `gcs`)
# lacks; read when gcsfs is imported.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

import jax  # noqa: E402  (after XLA_FLAGS)
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from configs import tiny  # noqa: E402
from configs.common import base_config  # noqa: E402
from model.config import get_config  # noqa: E402
from sharding import make_mesh, shard_batch  # noqa: E402
from training.data.text import PACKAGED_SHAKESPEARE  # noqa: E402
from training.optimizer import make_optimizer, schedule_from_config  # noqa: E402
from training.state import abstract_train_state, create_train_state  # noqa: E402
from training.step import compile_train_step  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

REPO = pathlib.Path(__file__).resolve().parents[1]
# 8 heads and a 64-symbol vocabulary, so tensor=8 really splits heads, MLP and vocabulary.
MESH_CFG = dict(num_layers=1, num_heads=8, d_model=64, vocab_size=64, block_size=16)


def rel_err(a, b) -> float:
  """||a - b|| / ||b|| (Frobenius; b the reference)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def exit_status(main, argv) -> int:
  """What an entry point's main(argv) ends with: its return value or its sys.exit status."""
  try:
    return main(argv)
  except SystemExit as e:
    return e.code


def subprocess_env(**changes) -> dict:
  """The environment of a `python -m launch.*` subprocess run from the checkout."""
  return dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu", **changes)


def run_module(module: str, *args: str, env: dict, timeout: int = 240):
  """`python -m <module> args...` in the checkout; the CompletedProcess (text output)."""
  return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout)


# Extra launch.train flags, with characters that two shells must both pass through (launch.tpu).
TRAIN_OVERRIDES = ["--config.train.batch_size=32", "--config.data.tfds_name=it's a test; rm -rf /",
                   '--config.data.path=$HOME/data "x"']


def remote_script(command) -> str:
  """The --command value of a gcloud ssh command (an argv list)."""
  return command[command.index("--command") + 1]


def mounted_tmpfs(path: pathlib.Path, options: str, what: str):
  """Mount a tmpfs with `options` (e.g. "size=1500k", "size=64k,ro") on the new folder `path`
  for the life of a fixture (yield from it); skipped where mounting is not allowed."""
  path.mkdir()
  out = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                       capture_output=True, text=True, check=False)
  if out.returncode != 0:
    pytest.skip(f"cannot mount {what} here: {out.stderr.strip()}")
  yield path
  subprocess.run(["umount", str(path)], check=True)


def optimizer_config(**changes):
  opt = base_config().optimizer
  opt.update(dict(lr=1e-3, min_lr=1e-4, warmup_steps=2), **changes)
  return opt


def random_batch(batch, seq_len, vocab, seed=0):
  """int32 tokens [batch, seq_len + 1]."""
  return np.random.default_rng(seed).integers(0, vocab, (batch, seq_len + 1)).astype(np.int32)


def two_step_losses(mesh, host_state=None):
  """Two AdamW steps of the MESH_CFG model on `mesh`: (losses, the initial host state)."""
  cfg = get_config("tiny", **MESH_CFG)
  opt = optimizer_config()
  tx, sched = make_optimizer(opt, 10), schedule_from_config(opt, 10)
  abstract, shardings = abstract_train_state(cfg, tx, mesh)
  if host_state is None:  # the single-device reference, created the normal (sharded) way
    state, _ = create_train_state(cfg, tx, mesh, seed=0)
  else:  # the same initial values, laid out on `mesh`
    state = jax.device_put(host_state, shardings)
  step = compile_train_step(cfg, tx, sched, mesh, abstract, (8, 17), grad_accum=1)
  initial = jax.device_get(state)
  losses = []
  for i in range(2):
    state, metrics = step(state, shard_batch(random_batch(8, 16, 64, seed=i), mesh))
    losses.append(float(metrics["loss"]))
  return losses, initial


def tiny_run_config(shakespeare_path, **train):
  """configs/tiny.py with one layer on `shakespeare_path`; section__key=value changes."""
  c = tiny.get_config()
  c.data.path = str(shakespeare_path)
  c.model.num_layers = 1
  for key, value in train.items():
    section, name = key.split("__")
    c[section][name] = value
  return c


@pytest.fixture(scope="session")
def single_device_run():
  """(losses of two steps, initial host TrainState) of the MESH_CFG model on one device."""
  return two_step_losses(make_mesh(1, 1, 1, devices=jax.devices()[:1]))


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
  """A directory holding tinyshakespeare.txt (the package's copy, or $FLAXGPT_DATA_DIR)."""
  return pathlib.Path(os.environ.get("FLAXGPT_DATA_DIR", PACKAGED_SHAKESPEARE.parent))


@pytest.fixture(scope="session")
def shakespeare_path(shared_data) -> pathlib.Path:
  return shared_data / "tinyshakespeare.txt"


@pytest.fixture
def small_text(tmp_path) -> pathlib.Path:
  """A 1.6k-character text file of Shakespeare-like lines."""
  path = tmp_path / "small.txt"
  path.write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n\n"
                  "All:\nSpeak, speak.\n" * 20)
  return path


# ---------------------------------------------------------------------------------------------
# GCS: a local server speaking the JSON API (tests/gcs_emulator.py)


class GCS:
  """The emulator of a test session: its URL, a bucket, and the environment that points the
  clients (TensorStore, gcsfs / etils.epath) at it."""

  def __init__(self, url: str, bucket: str):
    self.url, self.bucket = url, bucket
    self.env = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
                # gcsfs's newest layer first asks a gRPC control plane the emulator lacks
                "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}

  def path(self, *parts: str) -> str:
    return "/".join([f"gs://{self.bucket}", *parts])


def _free_port() -> int:
  import socket
  with socket.socket() as sock:
    sock.bind(("localhost", 0))
    return sock.getsockname()[1]


@pytest.fixture(scope="session")
def gcs():
  """A GCS emulator for the session with bucket "flaxgpt-test"; os.environ points this process's
  clients at it (subprocesses: pass gcs.env)."""
  pytest.importorskip("gcp_storage_emulator")
  pytest.importorskip("gcsfs")
  import urllib.request
  port = _free_port()
  proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "gcs_emulator.py"), str(port)],
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
  try:
    assert proc.stdout.readline().strip() == "ready", "the GCS emulator did not start"
    g = GCS(f"http://localhost:{port}", "flaxgpt-test")
    request = urllib.request.Request(f"{g.url}/storage/v1/b?project=test", method="POST",
                                     data=json.dumps({"name": g.bucket}).encode(),
                                     headers={"Content-Type": "application/json"})
    urllib.request.urlopen(request, timeout=10).read()
    saved = {k: os.environ.get(k) for k in g.env}
    os.environ.update(g.env)
    yield g
  finally:
    proc.kill()
    proc.wait()
  for k, v in saved.items():
    if v is None:
      os.environ.pop(k, None)
    else:
      os.environ[k] = v
