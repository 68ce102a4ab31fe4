"""Serve a model over OpenAI's API with continuous batching (training/serve/).

  python -m launch.serve (--workdir DIR [--step N] | --init_from HF_DIR|gpt2...)
      [--host 127.0.0.1] [--port 8000] [--slots 8] [--max_len N] [--decode_steps 8]
      [--max_prefills 16] [--max_queue 256] [--top_logprobs 20] [--sampling greedy,...,sorted]
      [--chat_template default|FILE]
      [--model_name NAME] [--dtype float32|bfloat16] [--data 1] [--tensor 1] [--grace 30]

Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions, GET /health,
GET /metrics. Every program (a prefill per prompt-length bucket, the decode step) is compiled
before the port opens; then one line `ready: http://HOST:PORT/v1 serving NAME (... compiled in
S s)` goes to stdout. SIGTERM or Ctrl-C drains: new requests get 503, those in flight finish
(at most --grace seconds), exit 0. A bad flag, a port in use or weights that cannot be read are
one `error:` line, exit 2, before anything is compiled.

--slots sequences decode at once, each with a KV cache of --max_len positions (default: the
model's block size; a request's prompt + max_tokens must fit); each device call advances every
active slot --decode_steps tokens; at most --max_prefills prompts are prefilled between two
device calls (a decode call costs the same with one busy slot or all, so by default a free slot
is filled at once, up to 16; lower it to keep streams smooth when long prompts arrive in bursts);
--max_queue sequences may wait (more: 429). The decode call is compiled in each --sampling
variant (greedy, plain temperature, top_k, sorted: sorted serves any request, the others are
cheaper for the requests they serve); fewer variants start faster. Chat needs a chat template:
a chat run's own, a Hugging Face directory's, or --chat_template (without one, chat requests
get 400).
--data x --tensor devices serve (the slots split over data, the heads over tensor).

Examples:
  python -m launch.serve --workdir runs/shakespeare_char_cpu --port 8000
  curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
      -d '{"prompt": "ROMEO:", "max_tokens": 40, "temperature": 0}'
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import sys

from absl import flags

from launch import cli, sample_chat
from launch.sample import choose_tokenizer, stop_token
from model.errors import UserError
from training.weights import WORKDIR, describe_weights, load_weights

FLAGS = flags.FlagValues()
flags.DEFINE_string("workdir", None, "A launch.train workdir: its latest checkpoint.",
                    flag_values=FLAGS)
flags.DEFINE_string("init_from", None, "A Hugging Face checkpoint directory (GPT-2 or Llama) "
                    "or a GPT-2 name (downloaded once).", flag_values=FLAGS)
flags.DEFINE_integer("step", None, "--workdir: this checkpoint instead of the latest.",
                     flag_values=FLAGS)
flags.DEFINE_string("host", "127.0.0.1", "Address to listen on.", flag_values=FLAGS)
flags.DEFINE_integer("port", 8000, "Port to listen on (0: any free port; the ready line says "
                     "which).", lower_bound=0, upper_bound=65535, flag_values=FLAGS)
flags.DEFINE_integer("slots", 8, "Sequences decoded at once.", lower_bound=1, flag_values=FLAGS)
flags.DEFINE_integer("max_len", 0, "KV-cache positions per slot: a request's prompt + "
                     "max_tokens (0: the model's block size).", lower_bound=0, flag_values=FLAGS)
flags.DEFINE_integer("decode_steps", 8, "Tokens every active slot advances per device call.",
                     lower_bound=1, flag_values=FLAGS)
flags.DEFINE_integer("max_prefills", 16, "Prompts prefilled between two decode calls.",
                     lower_bound=1, flag_values=FLAGS)
flags.DEFINE_integer("max_queue", 256, "Sequences that may wait for a slot (more: 429).",
                     lower_bound=1, flag_values=FLAGS)
flags.DEFINE_integer("top_logprobs", 20, "Most alternatives a request may ask for per token "
                     "(logprobs / top_logprobs).", lower_bound=1, flag_values=FLAGS)
flags.DEFINE_list("sampling", ["greedy", "plain", "top_k", "sorted"], "Decode variants "
                  "compiled (sorted serves any request and must be one; each other serves the "
                  "requests it can more cheaply).", flag_values=FLAGS)
flags.DEFINE_string("chat_template", None, "'default' (plain turns) or a .jinja file instead of "
                    "the model's own chat template.", flag_values=FLAGS)
flags.DEFINE_string("model_name", None, "The model's name in the API (default: the directory's "
                    "name).", flag_values=FLAGS)
flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "Compute dtype (default: the "
                  "checkpoint's; float32 for Hugging Face checkpoints).", flag_values=FLAGS)
flags.DEFINE_integer("data", 1, "Devices the slots are split over.", lower_bound=1,
                     flag_values=FLAGS)
flags.DEFINE_integer("tensor", 1, "Devices the heads, MLP and vocabulary are split over.",
                     lower_bound=1, flag_values=FLAGS)
flags.DEFINE_float("grace", 30.0, "Seconds in-flight requests may take after SIGTERM.",
                   lower_bound=0, flag_values=FLAGS)
flags.DEFINE_bool("quiet", False, "No status lines on stderr.", flag_values=FLAGS)


def _status(text: str) -> None:
  if not FLAGS.quiet:
    print(text, file=sys.stderr, flush=True)


def check_flags() -> None:
  if (FLAGS.workdir is None) == (FLAGS.init_from is None):
    raise UserError("Give one of --workdir (a training run) or --init_from (a Hugging Face "
                    "checkpoint).")
  if FLAGS.step is not None and FLAGS.workdir is None:
    raise UserError("--step needs --workdir.")
  if FLAGS.slots % FLAGS.data:
    raise UserError(f"--slots ({FLAGS.slots}) must be a multiple of --data ({FLAGS.data}).")
  from training.serve.programs import check_sampling  # pylint: disable=import-outside-toplevel
  check_sampling(FLAGS.sampling, "--sampling")


def bind(host: str, port: int) -> socket.socket:
  """A socket bound to (host, port), not yet listening; UserError if it cannot be had."""
  try:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
  except socket.gaierror as e:
    raise UserError(f"--host {host!r} is not an address this machine has ({e.strerror}).") \
        from None
  family, _, _, _, address = infos[0]
  sock = socket.socket(family, socket.SOCK_STREAM)
  sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
  try:
    sock.bind(address)
  except OSError as e:
    sock.close()
    why = "is in use" if e.errno == errno.EADDRINUSE else f"cannot be bound ({e.strerror})"
    raise UserError(f"--port {port} on {host} {why}; choose another port (0: any free one).") \
        from None
  return sock


def chat_setup(tokenizer, cfg):
  """(chat template or None, its end-of-turn id or None)."""
  workdir = FLAGS.workdir
  hf_dir = None
  if FLAGS.init_from is not None:
    from model.hf import resolve_checkpoint_dir  # pylint: disable=import-outside-toplevel
    from training.data.chat_template import hf_template  # pylint: disable=import-outside-toplevel
    hf_dir = resolve_checkpoint_dir(FLAGS.init_from)
    if FLAGS.chat_template is None and hf_template(hf_dir)[0] is None:
      return None, None
  elif FLAGS.chat_template is None and sample_chat.run_template(workdir) is None:
    return None, None
  template = sample_chat.chat_template(tokenizer, workdir=workdir, hf_dir=hf_dir,
                                       override=FLAGS.chat_template)
  return template, sample_chat.end_of_turn(template, tokenizer, cfg.vocab_size)


def _main(args: list[str]) -> int:
  cli.no_arguments(args)
  check_flags()
  sock = bind(FLAGS.host, FLAGS.port)
  logging.getLogger("absl").setLevel(logging.ERROR)
  import jax  # pylint: disable=import-outside-toplevel
  from sharding import make_mesh  # pylint: disable=import-outside-toplevel
  from training.serve import protocol  # pylint: disable=import-outside-toplevel
  from training.serve.engine import Engine, EngineConfig  # pylint: disable=import-outside-toplevel
  from training.serve.http import Server  # pylint: disable=import-outside-toplevel
  source = ({"name_or_dir": FLAGS.workdir, "kind": WORKDIR} if FLAGS.workdir is not None
            else {"name_or_dir": FLAGS.init_from})
  devices = FLAGS.data * FLAGS.tensor
  if devices > len(jax.devices()):
    raise UserError(f"--data x --tensor = {devices} devices, but this machine has "
                    f"{len(jax.devices())}.")
  try:
    w = describe_weights(**source, step=FLAGS.step, dtype=FLAGS.dtype)
    if w.cfg.family != "gpt":
      raise UserError(f"{w.label} is a model.family={w.cfg.family!r} model; the server serves "
                      f"decoder-only (gpt) models.")
    tokenizer = choose_tokenizer(w.tokenizer, w.cfg.vocab_size)
    template, end_of_turn = chat_setup(tokenizer, w.cfg)
    config = EngineConfig(slots=FLAGS.slots, max_len=FLAGS.max_len,
                          decode_steps=FLAGS.decode_steps, max_prefills=FLAGS.max_prefills,
                          max_queue=FLAGS.max_queue, top_n=FLAGS.top_logprobs,
                          sampling=tuple(FLAGS.sampling))
    mesh = make_mesh(FLAGS.data, 1, FLAGS.tensor, devices=jax.devices()[:devices])
    params = load_weights(**source, step=FLAGS.step, dtype=w.cfg.dtype).params
    engine = Engine(params, w.cfg, tokenizer, config, mesh=mesh,
                    stop_ids=[i for i in (stop_token(tokenizer, w.cfg.vocab_size),)
                              if i is not None])
  except (ValueError, OSError) as e:  # ours, and the clear errors of checkpoint loading
    raise UserError(str(e)) from None
  name = FLAGS.model_name or os.path.basename(os.path.normpath(source["name_or_dir"]))
  _status(f"serving {w.label} as {name!r}: {config.slots} slots x {engine.config.max_len} "
          f"positions, {tokenizer.name} tokenizer, {w.cfg.dtype} compute, chat "
          f"{'on' if template is not None else 'off (no chat template)'}; compiling "
          f"prefills for prompts of {', '.join(map(str, engine.buckets))} tokens and the "
          f"decode step")
  seconds = engine.compile()
  served = protocol.Served(model=name, tokenizer=tokenizer, max_len=engine.config.max_len,
                           max_n=config.slots, top_n=config.top_n, chat_template=template,
                           end_of_turn=end_of_turn)
  host, port = sock.getsockname()[:2]

  def ready() -> None:
    print(f"ready: http://{host}:{port}/v1 serving {name} ({engine.num_programs} programs "
          f"compiled in {seconds:.1f} s)", flush=True)

  engine.start()
  server = Server(engine, served, sock, grace=FLAGS.grace, on_ready=ready)
  try:
    server.run()
  finally:
    engine.stop()
  _status(f"stopped: {engine.metrics.value('generated_tokens_total'):.0f} tokens generated")
  return 0


def main(argv: list[str] | None = None) -> int:
  return cli.run(_main, FLAGS, __doc__, argv)


if __name__ == "__main__":
  sys.exit(main())
