"""Test setup: 8 fake CPU devices (so every sharding path runs), one compilation cache and one
data cache for the whole run (shared by pytest-xdist's workers and every `launch.*` subprocess a
test starts), and what several test files share: the packaged data files, trained tiny runs
built once per run, a tiny training run's pieces, and helpers."""

import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

# 8 fake CPU devices, and XLA:CPU compiling fast: LLVM's optimisation off, and its older
# (elemental) fusion emitters instead of the MLIR ones, which halves the compile time of the
# tests' small programs (tiny models run fast either way; results agree within float32 rounding).
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
# A subprocess that trains for many steps: one device, LLVM's optimisation on (the steps run ~4x
# faster), the fast fusion emitters.
ONE_DEVICE_XLA_FLAGS = "--xla_cpu_use_fusion_emitters=false"
TEST_XLA_FLAGS = "--xla_force_host_platform_device_count=8 " + FAST_COMPILE
if TEST_XLA_FLAGS not in os.environ.get("XLA_FLAGS", ""):  # (xdist's workers inherit it)
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + TEST_XLA_FLAGS).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# gcsfs's newest layer first asks a gRPC control plane that the GCS emulator (fixture `gcs`)
# lacks; read when gcsfs is imported.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

# One JAX persistent compilation cache and one tokenized-data cache per test run: a temporary
# directory made by the first process (pytest itself, or xdist's controller) and inherited
# through the environment by xdist's workers and by every subprocess a test starts, so the many
# runs of the same tiny configs compile each program once. Every program is cached (no minimum
# compile time or size). No maximum size: with one, JAX locks the directory and scans every
# entry at each write (quadratic in the ~2,500 programs of a run). Without the lock a reader
# racing a writer of the same entry can see it half-written; JAX then warns and compiles, as
# for a miss. Nothing is written to the user's ~/.cache.
RUN_DIR_ENV = "FLAXGPT_TEST_RUN_DIR"
_OWN_RUN_DIR = RUN_DIR_ENV not in os.environ
if _OWN_RUN_DIR:
  os.environ[RUN_DIR_ENV] = tempfile.mkdtemp(prefix="flaxgpt-tests-")
RUN_DIR = pathlib.Path(os.environ[RUN_DIR_ENV])
COMPILATION_CACHE = RUN_DIR / "jax-compilation-cache"
os.environ.update(JAX_COMPILATION_CACHE_DIR=str(COMPILATION_CACHE),
                  JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                  JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1",
                  FLAXGPT_CACHE_DIR=str(RUN_DIR / "data-cache"))
os.environ.pop("JAX_COMPILATION_CACHE_MAX_SIZE", None)

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

# The summary lists the skips; with FLAXGPT_STRICT_SKIPS=1 (.ci/run) a skip it does not allow
# fails the run.
pytest_plugins = ["skip_policy"]

# This process's persistent-cache lookups (subprocesses count their own; the summary at the end
# adds up the test processes and counts the programs in the cache).
_CACHE_EVENTS = {"/jax/compilation_cache/cache_hits": "hits",
                 "/jax/compilation_cache/cache_misses": "misses"}
CACHE_COUNTS = {"hits": 0, "misses": 0}


def _count_cache_event(event: str, **_) -> None:
  if event in _CACHE_EVENTS:
    CACHE_COUNTS[_CACHE_EVENTS[event]] += 1


jax.monitoring.register_event_listener(_count_cache_event)


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: takes over ~20 s on 2 cores; `-m \"not slow\"` "
                                     "leaves it out of the quick edit-loop run")
  config.addinivalue_line("markers", "xdist_group(name): tests that must share one pytest-xdist "
                                     "worker (run with --dist loadgroup)")
  config.stash[_COUNTS_KEY] = dict(CACHE_COUNTS)  # the workers' sums (controller), else unused


_COUNTS_KEY = pytest.StashKey[dict]()


def pytest_sessionfinish(session):
  workeroutput = getattr(session.config, "workeroutput", None)
  if workeroutput is not None:  # an xdist worker: hand its counts to the controller
    workeroutput["jax_cache_counts"] = dict(CACHE_COUNTS)


@pytest.hookimpl(optionalhook=True)  # an xdist hook
def pytest_testnodedown(node, error):  # pylint: disable=unused-argument
  counts = node.config.stash[_COUNTS_KEY]
  for key, value in getattr(node, "workeroutput", {}).get("jax_cache_counts", {}).items():
    counts[key] += value


def pytest_terminal_summary(terminalreporter, config):
  counts = config.stash[_COUNTS_KEY]
  if not hasattr(config, "workerinput"):
    for key in counts:  # a run without xdist: this process ran the tests
      counts[key] = max(counts[key], CACHE_COUNTS[key])
  programs = len(list(COMPILATION_CACHE.glob("*-cache"))) if COMPILATION_CACHE.exists() else 0
  terminalreporter.write_line(
      f"JAX compilation cache: {counts['hits']} hits and {counts['misses']} misses in the test "
      f"processes; {programs} programs cached by them and their subprocesses")


def pytest_unconfigure(config):  # pylint: disable=unused-argument
  if _OWN_RUN_DIR and not hasattr(config, "workerinput"):
    shutil.rmtree(RUN_DIR, ignore_errors=True)


def built_once(name: str, build) -> pathlib.Path:
  """The directory `build(path)` makes, made once per test run and shared by every xdist worker
  (under a file lock: the first to come builds, the others wait and reuse it). Tests read it; a
  test that writes into it works on its own copy (`copy_of`)."""
  import filelock  # pylint: disable=import-outside-toplevel
  path = RUN_DIR / "built-once" / name
  path.parent.mkdir(parents=True, exist_ok=True)
  done = path.parent / f"{name}.done"
  with filelock.FileLock(f"{path}.lock"):
    if not done.exists():
      shutil.rmtree(path, ignore_errors=True)
      build(path)
      done.touch()
  return path


def copy_of(path: pathlib.Path, tmp_path: pathlib.Path) -> pathlib.Path:
  """A private copy of a built_once directory, for a test that writes into it."""
  return pathlib.Path(shutil.copytree(path, tmp_path / path.name))


@pytest.fixture
def other_base(tmp_path):
  """The tiny GPT-2 fixture with one weight changed: another base of the same shape."""
  from safetensors.numpy import load_file, save_file  # pylint: disable=import-outside-toplevel
  fixture = pathlib.Path(__file__).resolve().parent / "fixtures" / "hf_gpt2_tiny"
  other = pathlib.Path(shutil.copytree(fixture, tmp_path / "other_base"))
  tensors = load_file(other / "model.safetensors")
  tensors["transformer.h.0.mlp.c_fc.weight"][0, 0] += 1.0
  save_file(tensors, other / "model.safetensors", metadata={"format": "pt"})
  return other

REPO = pathlib.Path(__file__).resolve().parents[1]
# 8 heads and a 64-symbol vocabulary, so tensor=8 really splits heads, MLP and vocabulary.
MESH_CFG = dict(num_layers=1, num_heads=8, d_model=64, vocab_size=64, block_size=16)


def rel_err(a, b) -> float:
  """The largest per-element error, relative to the reference's largest magnitude:
  max|a - b| / max|b| (b the reference). One wrong element shows at its full size (a norm over
  the whole array would average it away); an element near zero is held to the array's scale, as
  float rounding is."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  assert a.shape == b.shape, f"shapes differ: {a.shape} vs the reference's {b.shape}"
  return float(np.abs(a - b).max(initial=0.0) / max(np.abs(b).max(initial=0.0), 1e-30))


def assert_close(actual, expected, rtol: float, what: str = "") -> None:
  """rel_err(actual, expected) <= rtol for two arrays, or for two pytrees of arrays with the
  same structure (compared first); the failure names the leaf and the worst element. rtol as
  the dtype justifies: float32 ~1e-5, bfloat16 ~1e-2."""
  leaves_a, tree_a = jax.tree_util.tree_flatten_with_path(actual)
  leaves_e, tree_e = jax.tree_util.tree_flatten_with_path(expected)
  assert tree_a == tree_e, f"{what}: tree structures differ:\n{tree_a}\nvs\n{tree_e}"
  for (path, a), (_, e) in zip(leaves_a, leaves_e, strict=True):
    a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
    name = f"{what}{jax.tree_util.keystr(path)}"
    err = rel_err(a, e)
    if not err <= rtol:
      at = np.unravel_index(np.argmax(np.abs(a - e)), a.shape) if a.size else ()
      raise AssertionError(f"{name}: relative error {err:.3g} > {rtol:g} (worst at {at}: "
                           f"{a[at]!r} vs expected {e[at]!r})")


def hf_window_loss(model, ids, T: int, stride: int) -> tuple[float, int]:
  """Hugging Face's perplexity-guide loop over token ids with a transformers causal LM `model`
  (windows of T inputs, each scoring only the targets the windows before it did not), written
  with torch: (mean nats per scored token, scored tokens)."""
  import torch  # pylint: disable=import-outside-toplevel
  nll_sum, count, scored_end = 0.0, 0, 0
  for begin in range(0, len(ids), stride):
    end = min(begin + T, len(ids) - 1)  # inputs ids[begin:end], targets ids[begin+1:end+1]
    with torch.no_grad():
      logits = model(torch.tensor(ids[None, begin:end])).logits[0].double()
    nll = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[begin + 1:end + 1]),
                                            reduction="none")
    keep = torch.arange(begin + 1, end + 1) > scored_end
    nll_sum += float(nll[keep].sum())
    count += int(keep.sum())
    scored_end = end
    if end == len(ids) - 1:
      break
  return nll_sum / count, count


def exit_status(main, argv) -> int:
  """What an entry point's main(argv) ends with: its return value or its sys.exit status."""
  try:
    return main(argv)
  except SystemExit as e:
    return e.code


def subprocess_env(**changes) -> dict:
  """The environment of a `python -m launch.*` subprocess run from the checkout (with this run's
  compilation and data caches, and the test process's XLA_FLAGS unless `changes` has others:
  XLA_FLAGS="" is one device with LLVM's optimisation, faster for runs of many steps)."""
  return dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu", **changes)


def run_module(module: str, *args: str, env: dict, timeout: int = 240):
  """`python -m <module> args...` in the checkout; the CompletedProcess (text output)."""
  return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout)


def signal_after_first_checkpoint(cmd, env: dict, checkpoints, sig: int):
  """Start the launch.train command `cmd`, send it `sig` as soon as `checkpoints()` lists a step
  (polled every 20 ms, for at most 240 s) and wait for it: (returncode, stdout, stderr)."""
  proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 240
  while not checkpoints() and proc.poll() is None and time.time() < deadline:
    time.sleep(0.02)
  proc.send_signal(sig)
  stdout, stderr = proc.communicate(timeout=60)
  return proc.returncode, stdout, stderr


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


def adamw_start(cfg, mesh, batch_shape, host_state=None, **step_args):
  """A fresh AdamW run of `cfg` on `mesh` for comparing meshes: (state, the train step compiled
  for [B, W] batches, the initial host state). Without host_state the state is created the
  normal (sharded) way: the single-device reference; with it, the same values laid out on
  `mesh`."""
  opt = optimizer_config()
  tx, sched = make_optimizer(opt, 10), schedule_from_config(opt, 10)
  abstract, shardings = abstract_train_state(cfg, tx, mesh)
  state = (create_train_state(cfg, tx, mesh, seed=0)[0] if host_state is None
           else jax.device_put(host_state, shardings))
  step = compile_train_step(cfg, tx, sched, mesh, abstract, batch_shape, **step_args)
  return state, step, jax.device_get(state)


def two_step_losses(mesh, host_state=None):
  """Two AdamW steps of the MESH_CFG model on `mesh`: (losses, the initial host state)."""
  state, step, initial = adamw_start(get_config("tiny", **MESH_CFG), mesh, (8, 17), host_state)
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


# The tiny run many tests read: configs/tiny.py (2 layers, characters) for 20 steps, evaluated
# and saved at 10 and 20, logged every 5.
TINY_RUN_ARGS = ("--config", "configs/tiny.py", "--config.train.steps=20",
                 "--config.eval.every=10", "--config.checkpoint.every=10",
                 "--config.log.every=5")


@pytest.fixture(scope="session")
def tiny_run() -> tuple[pathlib.Path, str]:
  """(workdir, what launch.train printed) of `python -m launch.train TINY_RUN_ARGS`, run through
  launch.train.main in process once per test run. Read it; copy_of it to write into it."""
  import contextlib  # pylint: disable=import-outside-toplevel
  import io  # pylint: disable=import-outside-toplevel
  from launch import train as train_cli  # pylint: disable=import-outside-toplevel

  def build(workdir):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
      status = exit_status(train_cli.main, [*TINY_RUN_ARGS, "--workdir", str(workdir)])
    assert status == 0, err.getvalue()
    (workdir.parent / f"{workdir.name}.stdout").write_text(out.getvalue())

  workdir = built_once("tiny_run", build)
  return workdir, (workdir.parent / "tiny_run.stdout").read_text()


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


@pytest.fixture(scope="session")
def gcs():
  """A GCS emulator for the session (of this xdist worker) with bucket "flaxgpt-test", on a port
  it picks itself; os.environ points this process's clients at it (subprocesses: pass
  gcs.env)."""
  pytest.importorskip("gcp_storage_emulator")
  pytest.importorskip("gcsfs")
  import urllib.request
  proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "gcs_emulator.py")],
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
  try:
    line = proc.stdout.readline()
    assert line.startswith("ready "), f"the GCS emulator did not start: {line!r}"
    g = GCS(f"http://localhost:{line.split()[1]}", "flaxgpt-test")
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


@pytest.fixture(scope="session")
def transformers_lib():
  """(torch, transformers) for the live Hugging Face comparisons; the test is skipped where
  they are not installed (the committed fixtures are checked either way)."""
  torch = pytest.importorskip("torch")
  return torch, pytest.importorskip("transformers")


def tree_fingerprint(path) -> dict[str, str]:
  """{relative path: sha256 of the file's bytes, or "dir"} of everything under `path` ({} when
  it does not exist): taken before and after a command that must leave `path` as it was."""
  import hashlib  # pylint: disable=import-outside-toplevel
  root = pathlib.Path(path)
  if not root.exists():
    return {}
  out = {}
  for p in sorted(root.rglob("*")):
    key = str(p.relative_to(root))
    out[key] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
  return out
