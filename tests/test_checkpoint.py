"""training/checkpoint.py: what a killed save leaves behind is never loaded; a damaged newest
checkpoint (a truncated file, invalid metadata, a missing item, flipped bytes) is skipped with a
one-line warning, moved aside, and the run continues bit-for-bit from the previous one; readers
(launch.sample) fall back the same way; fingerprints are exact on any mesh."""

import json
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import built_once, exit_status, tiny_run_config
from launch import sample as sample_cli
from model.errors import UserError
from training.checkpoint import Checkpointer, load_for_inference, read_run_meta
from training.fingerprint import fingerprints
from training.loop import train
from training.metrics import read_metrics
from training.run import build_run
from training.step import abstract_like


def test_half_written_checkpoint_is_ignored(tmp_path, single_device_run):
  state = jax.device_put(single_device_run[1], jax.devices()[0])
  ckpt = Checkpointer(tmp_path, keep=2)
  ckpt.save(3, state, {"step": 3})
  ckpt.wait()
  ckpt.close()
  # What a process killed while saving step 7 leaves behind: orbax's temporary directory.
  junk = tmp_path / "checkpoints" / "7.orbax-checkpoint-tmp-1234"
  (junk / "state").mkdir(parents=True)
  (junk / "state" / "garbage").write_text("half")
  ckpt = Checkpointer(tmp_path, read_only=True)
  assert ckpt.latest_step() == 3 and ckpt.all_steps() == [3]
  restored, meta = ckpt.restore(abstract_like(state))
  assert meta["step"] == 3 and set(meta["fingerprints"]) >= {"params/wte/embedding"}
  np.testing.assert_array_equal(restored.params["wte"]["embedding"],
                                state.params["wte"]["embedding"])


def test_fingerprint_is_the_same_on_any_mesh_and_sees_one_flipped_bit(single_device_run):
  host = single_device_run[1]
  one = fingerprints(jax.device_put(host, jax.devices()[0]))
  mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(2, 4), ("a", "b"))
  spec = jax.sharding.PartitionSpec

  def place(x):  # shard every dimension that divides, over both mesh axes
    axes = [("a" if d % 2 == 0 else None) for d in x.shape[:1]] + [
        ("b" if d % 4 == 0 else None) for d in x.shape[1:2]]
    return jax.device_put(x, jax.sharding.NamedSharding(mesh, spec(*axes)))
  assert fingerprints(jax.tree_util.tree_map(place, host)) == one
  wte = np.array(host.params["wte"]["embedding"])
  wte.view(np.uint32)[3, 5] ^= 1 << 7
  flipped = host.replace(params=dict(host.params, wte={"embedding": wte}))
  changed = {k for k, v in fingerprints(flipped).items() if one[k] != v}
  assert changed == {"params/wte/embedding"}
  swapped = np.array(host.params["wte"]["embedding"])
  swapped[[0, 1]] = swapped[[1, 0]]  # the same words elsewhere: only the weighted sum sees it
  s = fingerprints(host.replace(params=dict(host.params, wte={"embedding": swapped})))
  assert s["params/wte/embedding"][0] == one["params/wte/embedding"][0]
  assert s["params/wte/embedding"] != one["params/wte/embedding"]


# An uninterrupted 28-step run with a checkpoint every 4 steps (7 of them), and six kinds of
# damage: the newest six checkpoints are damaged one kind each, so a resume falls back six
# times, to step 4, and must then reproduce steps 5..28 exactly.
STEPS, EVERY = 28, 4


@pytest.fixture(scope="module")
def reference(shakespeare_path):
  """(config, workdir, losses by step) of the uninterrupted run (made once per test run; the
  tests damage copies of it)."""
  c = tiny_run_config(shakespeare_path, train__steps=STEPS, checkpoint__every=EVERY,
                      checkpoint__keep=STEPS // EVERY, log__every=1, eval__every=0,
                      eval__batches=0)
  workdir = built_once("checkpoint_reference", lambda path: train(c, str(path), quiet=True))
  return c, workdir, _losses(workdir)


def _losses(workdir):
  return {r["step"]: r["loss"] for r in read_metrics(workdir)}


def _largest_array_file(step_dir):
  return max((p for p in (step_dir / "state").rglob("d/*") if p.is_file()),
             key=lambda p: p.stat().st_size)


def _truncate(step_dir, _):
  os.truncate(_largest_array_file(step_dir), 1000)


def _invalid_json(step_dir, _):
  (step_dir / "meta" / "metadata").write_text('{"step": 30, "model"')


def _flip_bytes(step_dir, _):
  """4000 bytes inverted in the largest array file (compressed data: the decoder may notice,
  or decode garbage that only the fingerprint catches)."""
  path = _largest_array_file(step_dir)
  data = bytearray(path.read_bytes())
  start = len(data) // 10
  for i in range(start, start + 4000):
    data[i] ^= 0xFF
  path.write_bytes(bytes(data))


def _rewrite_with_a_flipped_bit(step_dir, config):
  """A bit of params/wte/embedding flipped where the format still decodes it (storage errors
  below the compression): the arrays saved again so, under the original metadata and
  fingerprints."""
  run = build_run(config)
  step = int(step_dir.name)
  state, meta = Checkpointer(step_dir.parents[1], read_only=True).restore(run.abstract_state,
                                                                           step)
  host = jax.device_get(state)
  wte = np.array(host.params["wte"]["embedding"])
  wte.view(np.uint32)[7, 3] ^= 1 << 20
  host = host.replace(params=dict(host.params, wte={"embedding": wte}))
  shutil.rmtree(step_dir)
  manager = ocp.CheckpointManager(step_dir.parent)
  manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(jax.device_put(host, jax.tree_util.tree_map(
          lambda x: x.sharding, run.abstract_state))), meta=ocp.args.JsonSave(meta)),
      force=True)
  manager.wait_until_finished()
  manager.close()
  assert (step_dir / "state").is_dir()


# kind: (damage(step_dir, config), what the warning says)
DAMAGE = {
    "flipped-bytes": (_flip_bytes, ("could not be read", "differs from the fingerprint")),
    "flipped-bit": (_rewrite_with_a_flipped_bit,
                    ("the content of params/wte/embedding differs from the fingerprint",)),
    "truncated-file": (_truncate, ("could not be read",)),
    "invalid-metadata": (_invalid_json, ("its meta/metadata is not valid JSON",)),
    "no-state": (lambda d, _: shutil.rmtree(d / "state"), ("its state/ item is missing",)),
    "no-meta": (lambda d, _: shutil.rmtree(d / "meta"), ("its meta/ item is missing",)),
}


def _damaged_copy(reference, path, kinds):
  """A copy of the reference workdir whose newest checkpoints have `kinds` of damage, newest
  first; {step: kind}."""
  config, workdir, _ = reference
  shutil.copytree(workdir, path)
  damaged = {}
  for i, kind in enumerate(kinds):
    step = STEPS - EVERY * i
    DAMAGE[kind][0](path / "checkpoints" / str(step), config)
    damaged[step] = kind
  return damaged


def test_damaged_checkpoints_fall_back_and_continue_exactly(reference, tmp_path, capsys):
  config, _, expected = reference
  workdir = tmp_path / "run"
  damaged = _damaged_copy(reference, workdir, list(DAMAGE))
  capsys.readouterr()
  summary = train(config, str(workdir), quiet=True)
  warnings = capsys.readouterr().err.strip().splitlines()
  assert len(warnings) == len(damaged), warnings  # one line each
  for line, (step, kind) in zip(warnings, sorted(damaged.items(), reverse=True)):
    assert line.startswith(f"warning: the checkpoint of step {step} in "), line
    assert any(why in line for why in DAMAGE[kind][1]), (kind, line)
    assert line.endswith(f"moved aside to {step}.damaged-1; trying the previous one."), line
  assert summary["step"] == STEPS
  ckpts = workdir / "checkpoints"
  for step in damaged:  # kept for inspection, not deleted, and out of the new saves' way
    assert (ckpts / f"{step}.damaged-1").is_dir()
  assert Checkpointer(workdir, read_only=True).all_steps() == list(range(EVERY, STEPS + 1, EVERY))
  losses = _losses(workdir)
  assert sorted(losses) == list(range(1, STEPS + 1))
  assert losses == expected, "the resumed run differs from the uninterrupted one"


def test_readers_fall_back_from_a_damaged_newest_checkpoint(reference, tmp_path, capsys):
  _damaged_copy(reference, tmp_path / "a", ["no-meta"])
  step, meta = read_run_meta(tmp_path / "a")
  assert step == STEPS - EVERY and meta["model"]["vocab_size"] == 65
  warning = capsys.readouterr().err.strip().splitlines()
  assert len(warning) == 1 and f"step {STEPS} " in warning[0] and "meta/ item" in warning[0]
  flipped = tmp_path / "b"
  _damaged_copy(reference, flipped, ["flipped-bit"])
  cfg, params, _, step = load_for_inference(flipped)
  assert step == STEPS - EVERY and cfg.vocab_size == 65
  warning = capsys.readouterr().err.strip().splitlines()
  assert len(warning) == 1 and "params/wte/embedding differs" in warning[0], warning
  assert (flipped / "checkpoints" / str(STEPS)).is_dir()  # readers move nothing
  jax.tree_util.tree_map(np.testing.assert_array_equal, params,
                         load_for_inference(reference[1], step=step)[1])
  with pytest.raises(UserError, match=rf"step {STEPS} .* is damaged \(the content of "
                                      r"params/wte/embedding .*; choose another step \(4, "):
    load_for_inference(flipped, step=STEPS)


def test_checkpoint_without_fingerprints_still_restores(reference, tmp_path):
  workdir = reference[1]
  old = tmp_path / "old"
  shutil.copytree(workdir, old)
  path = old / "checkpoints" / str(STEPS) / "meta" / "metadata"
  meta = json.loads(path.read_text())
  del meta["fingerprints"]
  path.write_text(json.dumps(meta))
  _, params, _, step = load_for_inference(old)
  assert step == STEPS
  jax.tree_util.tree_map(np.testing.assert_array_equal, params,
                         load_for_inference(workdir)[1])


def test_sample_falls_back_from_damaged_arrays_in_the_newest_checkpoint(reference, tmp_path,
                                                                        capsys):
  """launch.sample without --step: the newest step's metadata reads fine but its arrays do not
  match their fingerprints, so the samples come from the previous step (with the warning)."""
  flipped = tmp_path / "run"
  _damaged_copy(reference, flipped, ["flipped-bit"])
  args = ["--prompt", "ROMEO:", "--max_new_tokens", "8", "--temperature", "0", "--json",
          "--quiet"]
  capsys.readouterr()
  assert exit_status(sample_cli.main, ["--workdir", str(flipped), *args]) == 0
  out = capsys.readouterr()
  warnings = [line for line in out.err.splitlines() if line.startswith("warning:")]
  assert len(warnings) == 1 and f"step {STEPS} " in warnings[0], out.err
  assert exit_status(sample_cli.main, ["--workdir", str(reference[1]), "--step",
                                       str(STEPS - EVERY), *args]) == 0
  expected = capsys.readouterr().out
  assert [json.loads(line)["token_ids"] for line in out.out.splitlines()] == \
      [json.loads(line)["token_ids"] for line in expected.splitlines()]
