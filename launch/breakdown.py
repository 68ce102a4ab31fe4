"""Where a training step's time goes: the step and its parts, each compiled and timed alone.

  python -m launch.breakdown --config configs/gpt2.py --config.train.batch_size=12 \
      --config.train.grad_accum=1 [--flag_sets all] [--steps 10] [--json FILE]

Parts (training/perf/breakdown.py): the whole step, forward, forward + backward, the optimizer
update alone, the loss alone (LM head + cross-entropy, forward and backward), and the step with
attention replaced by identity. --flag_sets also times the whole step under XLA flag sets, each
in a fresh process (XLA reads its flags once): `all`, names from
training/perf/breakdown.py's FLAG_SETS (latency_hiding, cublas_gemms, fp_conversion,
command_buffers; GPU flags: elsewhere XLA accepts and ignores them), or your own flags written
`--xla_name=value` (several joined by `+`). Your XLA_FLAGS are kept in every process; a set's
flags come after them. A malformed flag or an unknown set name is one `error:` line, exit 2,
before anything compiles. The config is built as launch.benchmark builds it (random tokens over
the model's vocabulary); GPT-family configs.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile

from absl import flags, logging
from ml_collections import config_flags

from launch import cli
from model.errors import UserError

FLAGS = flags.FlagValues()
config_flags.DEFINE_config_file("config", None, "Experiment config, e.g. configs/gpt2.py.",
                                flag_values=FLAGS)
flags.DEFINE_integer("steps", 10, "Timed calls of each part (after warm-up).", lower_bound=1,
                     flag_values=FLAGS)
flags.DEFINE_integer("warmup", 3, "Untimed calls of each part after compiling.", lower_bound=1,
                     flag_values=FLAGS)
flags.DEFINE_list("parts", ["all"], "Parts to time: all, or some of step, forward, "
                  "forward+backward, optimizer, loss, no_attention.", flag_values=FLAGS)
flags.DEFINE_list("flag_sets", [], "XLA flag sets to time the whole step under, each in its "
                  "own process: all, set names, or flags --xla_name=value joined by +.",
                  flag_values=FLAGS)
flags.DEFINE_string("json", None, "Also write the numbers as JSON to this file.",
                    flag_values=FLAGS)
flags.mark_flags_as_required(["config"], flag_values=FLAGS)

XLA_FLAG = re.compile(r"^--xla_[a-z0-9_]+=[A-Za-z0-9_.,:+-]+$")
_ARGV: list[str] = []


def resolve_flag_sets(values: list[str]) -> dict[str, tuple[str, ...]]:
  """--flag_sets as {name: flags}; UserError for an unknown name or a malformed flag."""
  from training.perf.breakdown import FLAG_SETS  # pylint: disable=import-outside-toplevel
  out: dict[str, tuple[str, ...]] = {}
  for value in values:
    if value == "all":
      out.update(FLAG_SETS)
    elif value in FLAG_SETS:
      out[value] = FLAG_SETS[value]
    elif value.startswith("--"):
      out[value] = tuple(f if f.startswith("--") else "--" + f for f in value.split("+--"))
    else:
      raise UserError(f"--flag_sets: unknown set {value!r}; use all, "
                      f"{', '.join(FLAG_SETS)}, or flags --xla_name=value joined by +.")
  for set_flags in out.values():  # the user's and the project's own sets alike
    for flag in set_flags:
      if not XLA_FLAG.match(flag):
        raise UserError(f"--flag_sets: {flag!r} is not an XLA flag of the form "
                        f"--xla_name=value (letters, digits, underscores; value without "
                        f"spaces).")
  return out


def _parts() -> tuple[str, ...]:
  from training.perf.breakdown import PARTS  # pylint: disable=import-outside-toplevel
  names = [p.replace("_", " ") for p in FLAGS.parts]
  if names == ["all"]:
    return PARTS
  bad = [p for p in names if p not in PARTS]
  if bad:
    raise UserError(f"--parts: unknown part {bad[0]!r}; use all or some of "
                    f"{', '.join(p.replace(' ', '_') for p in PARTS)}.")
  return tuple(names)


def _step_under(set_flags: tuple[str, ...]) -> tuple[float, str]:
  """The whole step's ms in a fresh process with set_flags after the user's XLA_FLAGS, and the
  XLA_FLAGS that process ran with (from its report)."""
  keep, skip_value = [], False
  for arg in _ARGV:  # this run's arguments without the ones the child is given its own of
    if skip_value:  # the value of a flag written "--json FILE"
      skip_value = False
      continue
    if arg.split("=", 1)[0].lstrip("-") in ("flag_sets", "parts", "json"):
      skip_value = "=" not in arg
      continue
    keep.append(arg)
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, "step.json")
    env = dict(os.environ, XLA_FLAGS=" ".join(
        [os.environ.get("XLA_FLAGS", ""), *set_flags]).strip())
    result = subprocess.run([sys.executable, "-m", "launch.breakdown", *keep, "--parts=step",
                             f"--json={out}"], env=env, capture_output=True, text=True,
                            check=False)
    if result.returncode != 0:
      last = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
      raise UserError(f"the step under {' '.join(set_flags)} failed: {last}")
    with open(out, encoding="utf-8") as f:
      child = json.load(f)
    return child["parts"]["step"], child["device"]["xla_flags"]


def _main(args: list[str]) -> int:
  logging.set_verbosity(logging.WARNING)
  cli.no_arguments(args)
  parts = _parts()
  flag_sets = resolve_flag_sets(FLAGS.flag_sets)
  config = cli.load_config(FLAGS)
  # pylint: disable=import-outside-toplevel  (they import jax)
  from training.perf import benchmark, breakdown
  if config.model.get("family", "gpt") != "gpt":
    raise UserError(f"launch.breakdown times GPT-family steps; this config's model.family is "
                    f"{config.model.family!r}.")
  run, _ = benchmark.random_token_run(config)
  ms = breakdown.measure(run, parts, steps=FLAGS.steps, warmup=FLAGS.warmup)
  children = {name: _step_under(set_flags) for name, set_flags in flag_sets.items()}
  under = {name: step_ms for name, (step_ms, _) in children.items()}
  report = {"device": benchmark.device_info(), "command": " ".join(["launch.breakdown", *_ARGV]),
            "batch": list(run.batch_shape), "parts": ms, "flag_sets": under,
            "flag_set_flags": {k: list(v) for k, v in flag_sets.items()},
            "flag_set_xla_flags": {name: flags for name, (_, flags) in children.items()}}
  dev = report["device"]
  print(f"device: {dev['device_kind']} x{dev['num_devices']}, jax {dev['jax_version']}; "
        f"XLA_FLAGS: {dev['xla_flags'] or '(not set)'}")
  print(f"batch {run.batch_shape[0]} x {run.batch_shape[1] - 1}, {run.model.dtype}, mesh "
        f"{dict(run.mesh.shape)}; median of {FLAGS.steps} calls after {FLAGS.warmup}")
  print(breakdown.format_table(ms, under))
  if FLAGS.json:
    with open(FLAGS.json, "w", encoding="utf-8") as f:
      json.dump(report, f, indent=2)
  return 0


def main(argv: list[str] | None = None) -> int:
  _ARGV[:] = list(sys.argv[1:] if argv is None else argv)
  return cli.run(_main, FLAGS, __doc__, argv)


if __name__ == "__main__":
  sys.exit(main())
