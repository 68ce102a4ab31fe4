"""A bounded load against an OpenAI-compatible server, or against launch.serve and transformers
serve side by side on the same weights (training/perf/serve_load.py says what is measured).

  python -m launch.loadgen --url http://127.0.0.1:8000 [--model NAME] [--requests 64]
      [--concurrency 1,16] [--repeats 2] [--rate 0] [--prompt_tokens 32,256]
      [--output_tokens 32,128] [--seed 0] [--time_limit 600] [--json FILE]
  python -m launch.loadgen --compare transformers --init_from HF_DIR [--slots 16]
      [--serve_args "--max_len 256 ..."] [--peer_args "--cb-num-blocks 32 ..."] ...

--url: a running server (ours, vLLM, transformers serve, ...). --compare transformers starts
`python -m launch.serve --init_from HF_DIR` and `transformers serve HF_DIR
--continuous-batching` (CPU), keeps both up, warms each with one request per slot of the
largest concurrency, and runs the same requests (same prompts and lengths, same seed) against
each, interleaved so that a change in the machine's load falls on both: ours at the first
--concurrency, theirs at it, ours at the next, theirs, ..., all of it --repeats times. Prompts
are tiny shakespeare windows in GPT-2 tokens; --rate > 0 draws Poisson arrivals. Prints, per
server and concurrency (its rounds pooled), TTFT, inter-token and end-to-end latency
(p50/p90/p99), requests/s, output tokens/s (and each round's) and errors. A server that dies
stops the run with its last line. transformers serve sizes its CPU KV cache from the memory
free when it starts (most of it): on a shared machine bound it with --peer_args
"--cb-num-blocks N" (N blocks of 256 tokens).
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time

from absl import flags

from launch import cli
from model.errors import UserError

FLAGS = flags.FlagValues()
flags.DEFINE_string("url", None, "A running server's base URL (without /v1).", flag_values=FLAGS)
flags.DEFINE_string("model", None, "The model name to send (default: the server's first).",
                    flag_values=FLAGS)
flags.DEFINE_enum("compare", None, ["transformers"], "Start launch.serve and this peer on "
                  "--init_from and load both.", flag_values=FLAGS)
flags.DEFINE_string("init_from", None, "--compare: a Hugging Face GPT-2 / Llama directory "
                    "(with tokenizer files).", flag_values=FLAGS)
flags.DEFINE_integer("slots", 16, "--compare: launch.serve's --slots.", lower_bound=1,
                     flag_values=FLAGS)
flags.DEFINE_string("serve_args", "", "--compare: more launch.serve flags, e.g. \"--max_len "
                    "256 --decode_steps 4\".", flag_values=FLAGS)
flags.DEFINE_string("peer_args", "", "--compare: more `transformers serve` flags, e.g. "
                    "\"--cb-num-blocks 32\".", flag_values=FLAGS)
flags.DEFINE_integer("repeats", 2, "Rounds over every server and concurrency (interleaved).",
                     lower_bound=1, flag_values=FLAGS)
flags.DEFINE_integer("requests", 64, "Requests per run.", lower_bound=1, flag_values=FLAGS)
flags.DEFINE_list("concurrency", ["1", "16"], "Most requests in flight (one run each).",
                  flag_values=FLAGS)
flags.DEFINE_float("rate", 0.0, "Poisson arrival rate, requests/s (0: as fast as the "
                   "concurrency allows).", lower_bound=0, flag_values=FLAGS)
flags.DEFINE_list("prompt_tokens", ["32", "256"], "Prompt lengths LO,HI (uniform).",
                  flag_values=FLAGS)
flags.DEFINE_list("output_tokens", ["32", "128"], "Output lengths LO,HI (uniform).",
                  flag_values=FLAGS)
flags.DEFINE_integer("seed", 0, "Draws of prompts, lengths and arrivals.", flag_values=FLAGS)
flags.DEFINE_float("time_limit", 600.0, "Seconds one run may take.", lower_bound=1,
                   flag_values=FLAGS)
flags.DEFINE_string("json", None, "Also write the reports as JSON here.", flag_values=FLAGS)


def _pair(values, name) -> tuple[int, int]:
  try:
    lo, hi = (int(v) for v in values)
  except ValueError:
    raise UserError(f"--{name} must be LO,HI (two integers), got {','.join(values)!r}.") \
        from None
  return lo, hi


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _check_alive(proc, log) -> None:
  """UserError with the server's last line if it has exited."""
  if proc.poll() is None:
    return
  log.seek(0)
  last = [line for line in log.read().decode(errors="replace").splitlines() if line.strip()]
  raise UserError(f"The server {' '.join(proc.args[:3])} exited ({proc.returncode}): "
                  f"{last[-1] if last else 'it printed nothing'}.")


def _wait_ready(url: str, model: str, proc, log, seconds: float = 600) -> None:
  import httpx  # pylint: disable=import-outside-toplevel
  deadline = time.time() + seconds
  while time.time() < deadline:
    _check_alive(proc, log)
    try:
      r = httpx.post(url + "/v1/completions", json={"model": model, "prompt": "Hi",
                                                    "max_tokens": 2}, timeout=120)
      if r.status_code == 200:
        return
    except httpx.HTTPError:
      pass
    time.sleep(2)
  raise UserError(f"{url} did not answer within {seconds:.0f} s.")


def _start(which: str):
  """(process, its output file, base URL, model name) of a started server."""
  env = dict(os.environ)
  log = tempfile.TemporaryFile()  # its output (stderr), for the error if it exits
  if which == "flaxgpt":
    proc = subprocess.Popen([sys.executable, "-m", "launch.serve", "--init_from",
                             FLAGS.init_from, "--port", "0", "--slots", str(FLAGS.slots),
                             *shlex.split(FLAGS.serve_args)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=log, text=True, env=env)
    line = proc.stdout.readline()
    if not line.startswith("ready: "):
      proc.wait(60)
      _check_alive(proc, log)
      raise UserError(f"launch.serve did not start: {line.strip()!r}.")
    return proc, log, line.split()[1].removesuffix("/v1"), line.split()[3]
  binary = shutil.which("transformers") or os.path.join(os.path.dirname(sys.executable),
                                                       "transformers")
  port = _free_port()
  proc = subprocess.Popen([binary, "serve", FLAGS.init_from, "--continuous-batching",
                           "--host", "127.0.0.1", "--port", str(port), "--device", "cpu",
                           "--log-level", "warning", *shlex.split(FLAGS.peer_args)],
                          stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                          env=env)
  url = f"http://127.0.0.1:{port}"
  _wait_ready(url, FLAGS.init_from, proc, log)
  return proc, log, url, FLAGS.init_from


def _main(args: list[str]) -> int:
  cli.no_arguments(args)
  if (FLAGS.url is None) == (FLAGS.compare is None):
    raise UserError("Give one of --url (a running server) or --compare transformers.")
  if FLAGS.compare and not FLAGS.init_from:
    raise UserError("--compare transformers needs --init_from (a Hugging Face directory).")
  try:
    levels = [int(c) for c in FLAGS.concurrency]
  except ValueError:
    raise UserError(f"--concurrency must be integers, got {','.join(FLAGS.concurrency)!r}.") \
        from None
  # pylint: disable=import-outside-toplevel
  from model.tokenizer import get_tokenizer
  from training.data.text import PACKAGED_SHAKESPEARE
  from training.perf import serve_load
  from training.perf.benchmark import describe_host_cpu, host_cpu
  specs = {c: serve_load.LoadSpec(
      requests=FLAGS.requests, concurrency=c, rate=FLAGS.rate,
      prompt_tokens=_pair(FLAGS.prompt_tokens, "prompt_tokens"),
      output_tokens=_pair(FLAGS.output_tokens, "output_tokens"), seed=FLAGS.seed,
      time_limit=FLAGS.time_limit) for c in levels}
  for spec in specs.values():
    spec.check()
  prompts = serve_load.make_prompts(next(iter(specs.values())), get_tokenizer("gpt2"),
                                    PACKAGED_SHAKESPEARE.read_text())
  print(f"host CPU: {describe_host_cpu(host_cpu())}", flush=True)
  procs, targets = {}, {}
  try:
    if FLAGS.compare:
      for name in ("flaxgpt", "transformers"):
        proc, log, url, model = _start(name)
        procs[name] = (proc, log)
        targets[name] = (url, model)
    else:
      targets[FLAGS.url] = (FLAGS.url.rstrip("/"), FLAGS.model or _first_model(FLAGS.url))
    warm = serve_load.LoadSpec(requests=max(levels), concurrency=max(levels))
    for url, model in targets.values():  # not measured: each server's first requests
      asyncio.run(serve_load.run_load(url, model, warm, [(p, 4) for p, _ in prompts]))
    runs: dict[tuple[str, int], list] = {}
    for r in range(FLAGS.repeats):
      for c, spec in specs.items():
        for name, (url, model) in targets.items():
          if name in procs:
            _check_alive(*procs[name])
          run = asyncio.run(serve_load.run_load(url, model, spec, prompts))
          runs.setdefault((name, c), []).append(run)
          tokens = sum(o.tokens for o in run.outcomes if o.ok)
          print(f"round {r + 1}: {name} concurrency {c}: {tokens / run.wall:.1f} output "
                f"tokens/s", flush=True)
    for proc_log in procs.values():  # alive to the end: no run was cut short by a crash
      _check_alive(*proc_log)
  finally:
    for proc, _ in procs.values():
      proc.terminate()
      proc.wait(60)
  reports = {f"{name} c={c}": serve_load.summarize(rs, specs[c])
             for (name, c), rs in runs.items()}
  print(serve_load.format_reports(reports))
  if FLAGS.json:
    with open(FLAGS.json, "w", encoding="utf-8") as f:
      json.dump(reports, f, indent=2)
  return 0


def _first_model(url: str) -> str:
  import httpx  # pylint: disable=import-outside-toplevel
  try:
    return httpx.get(url.rstrip("/") + "/v1/models", timeout=30).json()["data"][0]["id"]
  except (httpx.HTTPError, ValueError, KeyError, IndexError):
    raise UserError(f"{url}/v1/models did not name a model; give --model.") from None


def main(argv: list[str] | None = None) -> int:
  return cli.run(_main, FLAGS, __doc__, argv)


if __name__ == "__main__":
  sys.exit(main())
