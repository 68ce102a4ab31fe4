"""python -m launch.serve as a process: a bad command line is one sentence and exit 2 before
anything compiles; under faults (clients that go away mid-stream, invalid requests) nothing
answers 5xx, every slot is free at the end and resident memory stays flat; SIGTERM drains
(in-flight requests complete, new ones get 503) and exits 0."""

import concurrent.futures
import contextlib
import io
import json
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from conftest import REPO, exit_status, subprocess_env
from launch import serve as serve_cli
from model.hf import save_hf
from model.tokenizer import CharTokenizer, get_tokenizer
from scripted_model import scripted_gpt
from training.serve.metrics import parse
from training.weights import TOKENIZER_RECORD_FILE

# Emoji (some with a skin-tone modifier: two code points), CJK and accents: GPT-2's BPE splits
# most of these characters over two or more byte tokens.
EMOJI_PROMPT = "東京の寿司🍣と👋🏽:"
EMOJI_TEXT = " 世界！café 😀🍣 ✓東京"


def _run(argv):
  err = io.StringIO()
  with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
    status = exit_status(serve_cli.main, argv)
  return status, err.getvalue()


def test_port_in_use_is_one_sentence(tmp_path):
  with socket.socket() as taken:
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]  # (the port is checked before the workdir is read)
    status, err = _run(["--workdir", str(tmp_path), "--port", str(port)])
  assert status == 2
  assert err.strip() == (f"error: --port {port} on 127.0.0.1 is in use; choose another port "
                         f"(0: any free one).")


def test_workdir_without_a_checkpoint_is_one_sentence(tmp_path):
  (tmp_path / "run" / "checkpoints").mkdir(parents=True)
  status, err = _run(["--workdir", str(tmp_path / "run"), "--port", "0"])
  assert status == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1
  assert "checkpoint" in err


@pytest.mark.parametrize("argv,words", [
    ([], "Give one of --workdir"),
    (["--workdir", "x", "--slots", "0"], "--slots must be"),
    (["--workdir", "x", "--slots", "3", "--data", "2"], "must be a multiple of --data"),
    (["--workdir", "x", "--sampling", "greedy,top_k"], "--sampling must name some of"),
])
def test_bad_flags(argv, words):
  status, err = _run(argv)
  assert status == 2 and words in err


def _start_server(*argv):
  """`python -m launch.serve ARGV` on a free port, started (_ready_url waits for it)."""
  return subprocess.Popen(
      [sys.executable, "-m", "launch.serve", "--port", "0", "--quiet", *argv], cwd=REPO,
      env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _ready_url(proc) -> str:
  line = proc.stdout.readline()
  if not line.startswith("ready: http://127.0.0.1:"):
    proc.kill()
    pytest.fail(line + proc.communicate()[1])
  return line.split()[1].removesuffix("/v1")


@pytest.fixture(scope="module")
def scripted_servers(tmp_path_factory):
  """{"bpe" | "char": base URL} of two launch.serve processes started --init_from Hugging Face
  folders (GPT-2 BPE: 50,257 tokens; characters: launch.export's tokenizer record) whose
  models continue EMOJI_PROMPT greedily with EMOJI_TEXT (tests/scripted_model.py)."""
  chars = CharTokenizer(sorted(set(EMOJI_PROMPT + EMOJI_TEXT)))
  procs = {}
  for name, tok in (("bpe", get_tokenizer("gpt2")), ("char", chars)):
    folder = tmp_path_factory.mktemp(name)
    cfg, params = scripted_gpt(tok.vocab_size, len(tok.encode(EMOJI_PROMPT)),
                               tok.encode(EMOJI_TEXT))
    save_hf(params, cfg, folder)
    if name == "char":
      (folder / TOKENIZER_RECORD_FILE).write_text(json.dumps(tok.to_dict()))
    # one token per device call, so every token's text is streamed on its own
    procs[name] = _start_server("--init_from", str(folder), "--slots", "2", "--decode_steps",
                                "1", "--sampling", "greedy,sorted", "--top_logprobs", "1")
  try:
    yield {name: _ready_url(proc) for name, proc in procs.items()}
  finally:
    for proc in procs.values():
      proc.terminate()
      assert proc.wait(60) == 0


@pytest.mark.slow  # two server processes: ~40 s on the loaded 2-core machine
@pytest.mark.parametrize("name", ["bpe", "char"])
def test_emoji_and_cjk_stream_through_launch_serve_without_replacement_characters(
    scripted_servers, name):
  openai = pytest.importorskip("openai")
  client = openai.OpenAI(base_url=scripted_servers[name] + "/v1", api_key="none",
                         max_retries=0)
  model = client.models.list().data[0].id
  if name == "bpe":  # the text's tokens do split characters
    tok = get_tokenizer("gpt2")
    assert sum("\ufffd" in tok.decode([i]) for i in tok.encode(EMOJI_TEXT)) >= 10
  size = len(get_tokenizer("gpt2").encode(EMOJI_TEXT) if name == "bpe" else EMOJI_TEXT)
  chunks = list(client.completions.create(model=model, prompt=EMOJI_PROMPT, max_tokens=size,
                                           temperature=0, stream=True))
  pieces = [c.choices[0].text for c in chunks if c.choices and c.choices[0].text]
  assert "".join(pieces) == EMOJI_TEXT
  assert not any("\ufffd" in p for p in pieces), pieces
  assert len(pieces) >= 8  # streamed piece by piece, not in one chunk at the end


def _rss_kib(pid: int) -> int:
  with open(f"/proc/{pid}/status", encoding="utf-8") as f:
    return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def _stream(url, body, disconnect_after=None):
  """POST a streamed completion; read it all (or close after `disconnect_after` chunks):
  (status, chunks read, text read)."""
  with httpx.Client(timeout=120) as client:
    with client.stream("POST", url + "/v1/completions", json=body) as r:
      if r.status_code != 200:
        r.read()
        return r.status_code, 0, ""
      n, text = 0, []
      for line in r.iter_lines():
        if line.startswith("data: {"):
          n += 1
          text += [c["text"] for c in json.loads(line[6:])["choices"]]
          if disconnect_after is not None and n >= disconnect_after:
            return 200, n, "".join(text)  # leaving the block closes the connection mid-stream
      return 200, n, "".join(text)


@pytest.mark.slow
def test_faults_then_sigterm_drains_and_exits_0(tiny_run):
  proc = subprocess.Popen(
      [sys.executable, "-m", "launch.serve", "--workdir", str(tiny_run[0]), "--port", "0",
       "--slots", "4", "--max_len", "64", "--decode_steps", "4", "--top_logprobs", "2",
       "--max_queue", "64", "--quiet"],
      cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    line = proc.stdout.readline()
    assert line.startswith("ready: http://127.0.0.1:"), line + proc.stderr.read()
    url = line.split()[1].removesuffix("/v1")
    good = {"prompt": "ROMEO:", "max_tokens": 30, "temperature": 0.8, "stream": True}
    bodies = []
    for i in range(200):
      if i % 10 == 3:
        bodies.append(({"prompt": "ROMEO:", "top_p": 7, "stream": True}, None))  # invalid
      elif i % 5 == 1:
        bodies.append((good, 2))  # the client goes away after 2 chunks
      else:
        bodies.append((good, None))
    statuses, rss = [], []
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
      for status, _, _ in pool.map(lambda b: _stream(url, *b), bodies):
        statuses.append(status)
        rss.append(_rss_kib(proc.pid))
    assert statuses.count(400) == 20 and statuses.count(200) == 180
    time.sleep(1)
    metrics = parse(httpx.get(url + "/metrics").text)
    assert metrics["flaxgpt_serve_active_slots"] == 0 and metrics["flaxgpt_serve_queue_depth"] == 0
    assert metrics['flaxgpt_serve_requests_total{reason="cancelled"}'] > 0
    half = rss[len(rss) // 2:]
    assert max(half) <= 1.05 * min(half), (min(half), max(half))

    # SIGTERM while requests run: they complete, a new one gets 503, the process exits 0.
    slow = dict(good, max_tokens=50, temperature=0)
    with concurrent.futures.ThreadPoolExecutor(24) as pool:
      running = [pool.submit(_stream, url, slow) for _ in range(24)]
      while True:  # every slot busy and more waiting: requests in flight
        m = parse(httpx.get(url + "/metrics").text)
        if m["flaxgpt_serve_active_slots"] == 4 and m["flaxgpt_serve_queue_depth"] >= 4:
          break
      in_flight = m["flaxgpt_serve_active_slots"] + m["flaxgpt_serve_queue_depth"]
      proc.send_signal(signal.SIGTERM)
      late = httpx.post(url + "/v1/completions", json={"prompt": "A", "max_tokens": 2})
      assert late.status_code == 503 and "shutting down" in late.json()["error"]["message"]
      results = [f.result() for f in running]
    # those accepted complete (50 characters each); those that came after the signal got 503
    accepted = [len(text) for status, _, text in results if status == 200]
    assert len(accepted) >= in_flight and set(accepted) == {50}
    assert {status for status, _, _ in results} <= {200, 503}
    assert proc.wait(60) == 0
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
