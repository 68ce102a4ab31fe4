"""python -m launch.breakdown: the train step and its parts timed alone, the step under XLA
flag sets in fresh processes; bad sets and flags are one sentence before anything compiles."""

import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import exit_status
from launch import breakdown as breakdown_cli
from model.config import get_config
from model.families import build, init_params
from training.perf import breakdown

ARGS = ["--config", "configs/tiny.py", "--config.model.num_layers=1", "--steps", "1",
        "--warmup", "1"]


def test_every_part_is_timed_and_the_step_under_a_flag_set(tmp_path, capsys):
  """The child process that times the step under a set runs with the user's XLA_FLAGS (here
  the tests') and the set's flags after them."""
  out = tmp_path / "b.json"
  flag = "--xla_gpu_enable_triton_gemm=false"
  assert exit_status(breakdown_cli.main, [
      *ARGS, f"--flag_sets={flag}", "--json", str(out)]) == 0
  report = json.loads(out.read_text())
  assert list(report["parts"]) == list(breakdown.PARTS)
  assert all(ms > 0 for ms in report["parts"].values())
  assert report["flag_sets"][flag] > 0  # a child process
  assert report["flag_set_xla_flags"] == {flag: f"{os.environ['XLA_FLAGS']} {flag}"}
  stdout = capsys.readouterr().out
  assert "no attention" in stdout and "step, flags --xla_gpu_enable_triton_gemm=false" in stdout


def test_attention_as_identity_drops_the_attention_but_not_the_projections():
  cfg = get_config("llama-tiny", vocab_size=64, num_layers=1, d_model=64, d_mlp=96)
  params = init_params(cfg, jax.random.key(0))
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 16)))
  normal = build(cfg).apply({"params": params}, tokens)
  with breakdown.attention_as_identity():
    identity = build(cfg).apply({"params": params}, tokens)
  assert identity.shape == normal.shape and not np.allclose(identity, normal)
  # position 0 attends only to itself: identity there is exact attention
  np.testing.assert_allclose(identity[:, 0], normal[:, 0], rtol=1e-5, atol=1e-5)


def test_every_project_flag_set_is_one_xla_knows():
  """XLA parses XLA_FLAGS when its CPU client starts and aborts on a flag it does not know or
  a value it cannot read (GPU flags included): every flag of FLAG_SETS starts it, a misspelt one
  or a value it cannot read does not. A failure shows XLA's error lines (not the flag list it
  prints after them)."""
  def start(flags):
    return subprocess.run([sys.executable, "-c", "import jax; print(jax.devices()[0].platform)"],
                          env=dict(os.environ, XLA_FLAGS=" ".join(flags), JAX_PLATFORMS="cpu"),
                          capture_output=True, text=True, timeout=240, check=False)
  def errors(run):  # XLA's error (E) and fatal (F) log lines
    return "\n".join(line for line in run.stderr.splitlines()
                     if re.match(r"[EF]\d{4} ", line)) or run.stderr[-2000:]
  every = [flag for flags in breakdown.FLAG_SETS.values() for flag in flags]
  assert len(every) >= 4
  ok = start(every)
  assert ok.returncode == 0 and ok.stdout.strip() == "cpu", errors(ok)
  misspelt = start([every[0].replace("enable", "enabel")])
  assert misspelt.returncode != 0 and "Unknown flag in XLA_FLAGS" in errors(misspelt)
  unreadable = start(["--xla_allow_excess_precision=yes"])
  assert unreadable.returncode != 0 and "Couldn't interpret value yes" in errors(unreadable)


@pytest.mark.parametrize("args, message", [
    (["--flag_sets=fast"], "--flag_sets: unknown set 'fast'; use all, latency_hiding, "
                           "cublas_gemms, fp_conversion, command_buffers, or flags"),
    (["--flag_sets=--xla_gpu_x=1+--xla bad"], "--flag_sets: '--xla bad' is not an XLA flag of "
                                              "the form --xla_name=value"),
    (["--flag_sets=--xla_gpu_x"], "'--xla_gpu_x' is not an XLA flag of the form --xla_name=value"),
    (["--parts=forward,backward"], "--parts: unknown part 'backward'; use all or some of step, "
                                   "forward, forward+backward, optimizer, loss, no_attention."),
    (["--config.model.family=bert"], "launch.breakdown times GPT-family steps; this config's "
                                     "model.family is 'bert'."),
])
def test_bad_input_is_one_sentence_before_compiling(args, message, capsys):
  assert exit_status(breakdown_cli.main, [*ARGS, *args]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_a_flag_xla_does_not_know_is_refused_before_anything_is_measured(monkeypatch, capsys):
  """XLA's own parser is asked first: the parent measures nothing (measure fails the test if
  called) and no child runs a step."""
  def measured(*args, **kwargs):
    raise AssertionError("the step was measured before the flag sets were checked")
  monkeypatch.setattr(breakdown, "measure", measured)
  assert exit_status(breakdown_cli.main, [*ARGS, "--flag_sets=--xla_bogus_flag=1"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith(
      "error: --flag_sets holds a flag XLA does not know: --xla_bogus_flag=1 (XLA_FLAGS="), err
