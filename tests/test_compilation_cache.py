"""The test run's JAX persistent compilation cache (tests/conftest.py): every launch.* process a
test starts reads and writes it, so a program compiled once in a run is loaded after that; what
comes out of the cache trains to the same numbers, bit for bit, as what was compiled fresh."""

import os
import re
import subprocess
import sys

import numpy as np
import pytest

from conftest import (CACHE_COUNTS, COMPILATION_CACHE, ONE_DEVICE_XLA_FLAGS, run_module,
                      subprocess_env)
from training.metrics import read_metrics

ARGS = ("--config", "configs/tiny.py", "--config.train.steps=4", "--config.eval.every=2",
        "--config.log.every=1", "--config.model.num_layers=1", "--quiet")


def test_subprocesses_and_this_process_share_the_runs_cache(tmp_path):
  """A program one subprocess (started with subprocess_env) compiles is written to the run's
  cache: a second subprocess and this test process load it from there instead of compiling."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  salt = float(int.from_bytes(os.urandom(3), "little"))  # a program no earlier test compiled
  program = lambda x: jnp.sin(x) * 31.4159 + salt
  script = ("import jax, jax.numpy as jnp, numpy as np\n"
            f"print(jax.jit(lambda x: jnp.sin(x) * 31.4159 + {salt!r})(np.arange(3.0)))\n")
  env = subprocess_env(JAX_LOG_COMPILES="1")
  before = set(COMPILATION_CACHE.iterdir()) if COMPILATION_CACHE.exists() else set()
  outs = [subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                         timeout=240, check=True) for _ in range(2)]
  hit = "Persistent compilation cache hit"
  assert hit not in outs[0].stderr, outs[0].stderr[-2000:]
  assert len(set(COMPILATION_CACHE.iterdir()) - before) == 1
  assert hit in outs[1].stderr, outs[1].stderr[-2000:]
  hits = CACHE_COUNTS["hits"]
  assert str(jax.jit(program)(np.arange(3.0))) == outs[0].stdout.strip()
  assert CACHE_COUNTS["hits"] == hits + 1


@pytest.mark.slow
def test_a_second_process_loads_every_program_and_trains_the_same(tmp_path):
  """Two launch.train processes with one config and an empty cache of their own: the first
  compiles and writes each program, the second finds every one (JAX's compile log) and writes
  nothing; their losses are equal."""
  cache = tmp_path / "cache"
  env = subprocess_env(XLA_FLAGS=ONE_DEVICE_XLA_FLAGS, JAX_COMPILATION_CACHE_DIR=str(cache),
                       JAX_LOG_COMPILES="1")
  fresh = run_module("launch.train", *ARGS, "--workdir", str(tmp_path / "fresh"), env=env)
  assert fresh.returncode == 0, fresh.stderr[-3000:]
  written = sorted(p.name for p in cache.iterdir())
  compiled = re.findall(r"Compiling (\S+?) with", fresh.stderr)
  assert len(written) == len(compiled) >= 3  # at least the train and eval steps and the init
  assert "Persistent compilation cache hit" not in fresh.stderr

  cached = run_module("launch.train", *ARGS, "--workdir", str(tmp_path / "cached"), env=env)
  assert cached.returncode == 0, cached.stderr[-3000:]
  hits = re.findall(r"Persistent compilation cache hit for '(\S+)'", cached.stderr)
  assert len(hits) == len(re.findall(r"Compiling (\S+?) with", cached.stderr)) == len(written)
  assert sorted(p.name for p in cache.iterdir()) == written  # nothing compiled anew

  rows = lambda name: [(r["step"], r["loss"], r.get("val_loss"))
                       for r in read_metrics(tmp_path / name)]
  assert rows("cached") == rows("fresh") and len(rows("fresh")) == 4
