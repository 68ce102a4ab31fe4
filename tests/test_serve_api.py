"""The OpenAI-compatible server (training/serve/, launch.serve) checked with the official `openai`
client against a real server on 127.0.0.1 (an ephemeral port, in this process: one compile
for the module), serving the shared tiny run (characters, block 64).

References: launch.sample's tokens (greedy, and seeded sampling with n=2), transformers'
generate on the run exported by launch.export, launch.eval's scoring function
(training.evaluate.score) and a full forward pass for the prompt's log-probabilities."""

import contextlib
import io
import json
import threading
import time
import types

import httpx
import jax
import numpy as np
import pytest

from conftest import exit_status

openai = pytest.importorskip("openai")

from launch import export as export_cli  # noqa: E402
from launch import sample as sample_cli  # noqa: E402
from launch.serve import bind  # noqa: E402
from model.gpt import GPT  # noqa: E402
from model.tokenizer import tokenizer_from_dict  # noqa: E402
from training.data.chat_template import ChatTemplate  # noqa: E402
from training.serve import protocol  # noqa: E402
from training.serve.engine import Engine, EngineConfig  # noqa: E402
from training.serve.http import Server  # noqa: E402
from training.serve.metrics import parse  # noqa: E402
from training.serve.requests import Request  # noqa: E402
from training.weights import load_weights  # noqa: E402

# A chat template whose turns end with a newline (a character of the run's vocabulary).
TEMPLATE = ("{% for m in messages %}{{ m.role | upper }}: {{ m.content }}\n{% endfor %}"
            "{% if add_generation_prompt %}ASSISTANT:{% endif %}")
PROMPT = "ROMEO:\nWhat say you"


@pytest.fixture(scope="module")
def served(tiny_run):
  workdir = tiny_run[0]
  w = load_weights(str(workdir))
  tok = tokenizer_from_dict(w.tokenizer)
  # the greedy decode variant and the one that serves any request (the other two variants are
  # the slow tests' business: tests/test_serve_engine.py)
  engine = Engine(w.params, w.cfg, tok, EngineConfig(slots=4, max_len=64, decode_steps=4,
                                                     top_n=5, max_queue=8,
                                                     sampling=("greedy", "sorted")))
  engine.compile()
  engine.start()
  template = ChatTemplate(TEMPLATE)
  api = protocol.Served(model="tiny", tokenizer=tok, max_len=64, max_n=4, top_n=5,
                        chat_template=template, end_of_turn=template.end_of_turn(tok))
  sock = bind("127.0.0.1", 0)
  server = Server(engine, api, sock)
  thread = threading.Thread(target=server.run, daemon=True)
  thread.start()
  while not server.started:
    time.sleep(0.01)
  url = f"http://127.0.0.1:{sock.getsockname()[1]}"
  yield types.SimpleNamespace(url=url, engine=engine, tok=tok, w=w, workdir=workdir,
                              client=openai.OpenAI(base_url=url + "/v1", api_key="none",
                                                   max_retries=0))
  server.should_exit = True
  thread.join(10)
  engine.stop()


def _sample(workdir, prompt, *flags):
  out = io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
    assert exit_status(sample_cli.main, ["--workdir", str(workdir), "--prompt", prompt,
                                         "--json", "--no_stop", *flags]) == 0
  return [json.loads(line) for line in out.getvalue().splitlines()]


def test_models_list(served):
  assert [m.id for m in served.client.models.list().data] == ["tiny"]


def test_greedy_equals_launch_sample_streamed_or_not(served):
  want = _sample(served.workdir, PROMPT, "--temperature", "0", "--max_new_tokens", "30")[0]
  got = served.client.completions.create(model="tiny", prompt=PROMPT, max_tokens=30,
                                         temperature=0)
  assert got.choices[0].text == want["completion"]
  assert got.choices[0].finish_reason == "length"
  assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (len(PROMPT), 30)
  chunks = list(served.client.completions.create(
      model="tiny", prompt=PROMPT, max_tokens=30, temperature=0, stream=True,
      stream_options={"include_usage": True}))
  assert "".join(c.choices[0].text for c in chunks if c.choices) == want["completion"]
  assert chunks[-1].usage.completion_tokens == 30 and not chunks[-1].choices


def test_greedy_equals_transformers_generate_on_the_export(served, tmp_path, transformers_lib):
  torch, transformers = transformers_lib
  with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
    assert exit_status(export_cli.main, ["--workdir", str(served.workdir), "--out",
                                         str(tmp_path / "hf")]) == 0
  model = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "hf")).eval()
  ids = served.tok.encode(PROMPT)
  with torch.no_grad():
    out = model.generate(torch.tensor([ids]), max_new_tokens=40, do_sample=False,
                         attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         pad_token_id=0)
  got = served.client.completions.create(model="tiny", prompt=ids, max_tokens=40,
                                         temperature=0)
  assert served.tok.encode(got.choices[0].text) == out[0, len(ids):].tolist()


def test_seeded_n2_equals_launch_sample(served):
  want = _sample(served.workdir, PROMPT, "--temperature", "0.8", "--top_k", "20", "--seed",
                 "3", "--num_samples", "2", "--max_new_tokens", "25")
  got = served.client.completions.create(model="tiny", prompt=PROMPT, max_tokens=25,
                                         temperature=0.8, extra_body={"top_k": 20}, seed=3, n=2)
  assert [c.text for c in got.choices] == [w["completion"] for w in want]
  assert got.usage.completion_tokens == 50 and got.usage.prompt_tokens == len(PROMPT)


def test_stop_strings_spanning_tokens_never_leak(served):
  full = served.client.completions.create(model="tiny", prompt=PROMPT, max_tokens=40,
                                          temperature=0).choices[0].text
  stop = full[12:15]  # three tokens of a character model
  cut = full.index(stop)
  for stream in (False, True):
    if stream:
      chunks = list(served.client.completions.create(
          model="tiny", prompt=PROMPT, max_tokens=40, temperature=0, stop=[stop, "@@"],
          stream=True, stream_options={"include_usage": True}))
      pieces = [c.choices[0].text for c in chunks if c.choices]
      assert all(stop[:2] not in p for p in pieces[:-1])
      text, reason = "".join(pieces), [c.choices[0].finish_reason for c in chunks
                                        if c.choices][-1]
      used = chunks[-1].usage
    else:
      got = served.client.completions.create(model="tiny", prompt=PROMPT, max_tokens=40,
                                             temperature=0, stop=[stop, "@@"])
      text, reason, used = got.choices[0].text, got.choices[0].finish_reason, got.usage
    assert (text, reason) == (full[:cut], "stop")
    assert used.completion_tokens == cut + len(stop)  # tokens generated up to the stop


def test_logprobs_equal_launch_eval_scoring(served):
  from sharding import make_mesh
  from training.evaluate import Window, score
  text = "KING RICHARD:\nNow is the winter of our discontent made"
  ids = served.tok.encode(text)
  got = served.client.completions.create(model="tiny", prompt=text, max_tokens=0, echo=True,
                                         logprobs=2)
  lp = got.choices[0].logprobs
  assert got.choices[0].text == text and lp.token_logprobs[0] is None
  assert lp.tokens == list(text)
  mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
  nats, count = score(served.w.params, served.w.cfg, np.asarray(ids),
                      [Window(0, len(ids) - 1, 0)], mesh=mesh, quiet=True)
  assert count == len(ids) - 1
  np.testing.assert_allclose(-sum(lp.token_logprobs[1:]), nats, rtol=1e-5)
  logits = GPT(served.w.cfg).apply({"params": served.w.params}, np.asarray([ids]))[0]
  ref = jax.nn.log_softmax(logits[:-1], axis=-1)
  want = np.asarray(ref)[np.arange(len(ids) - 1), ids[1:]]
  np.testing.assert_allclose(lp.token_logprobs[1:], want, rtol=1e-4, atol=1e-5)
  for t, top in enumerate(lp.top_logprobs[1:]):
    best = np.argsort(-np.asarray(ref[t]), kind="stable")[:2]
    assert list(top) == [served.tok.decode([int(b)]) for b in best]


def test_chat_streamed_and_not(served):
  messages = [{"role": "user", "content": "Who is there?"}]
  rendered = "USER: Who is there?\nASSISTANT:"
  plain = served.client.completions.create(model="tiny", prompt=rendered, max_tokens=30,
                                           temperature=0, stop="\n").choices[0].text
  got = served.client.chat.completions.create(model="tiny", messages=messages,
                                              max_completion_tokens=30, temperature=0,
                                              logprobs=True, top_logprobs=2)
  assert got.choices[0].message.content == plain
  assert got.choices[0].finish_reason == ("stop" if len(plain) < 30 else "length")
  assert len(got.choices[0].logprobs.content) == got.usage.completion_tokens
  assert got.usage.prompt_tokens == len(rendered)
  chunks = list(served.client.chat.completions.create(model="tiny", messages=messages,
                                                      max_tokens=30, temperature=0,
                                                      stream=True))
  assert chunks[0].choices[0].delta.role == "assistant"
  assert "".join(c.choices[0].delta.content or "" for c in chunks) == plain


BAD = [
    ("completions", "{not json", "not valid JSON"),
    ("completions", {"prompt": "x", "max_tokens": "ten"}, "'max_tokens' must be an integer"),
    ("completions", {"prompt": "x", "n": 5}, "'n' must be in [1, 4]"),
    ("completions", {"prompt": "x", "max_tokens": 70}, "more than the 64"),
    ("completions", {"prompt": "x", "temperature": -0.5}, "'temperature' must be"),
    ("completions", {"prompt": "x", "top_p": 0}, "'top_p' must be in (0, 1]"),
    ("completions", {"prompt": "x", "top_p": 1.5}, "'top_p' must be in (0, 1]"),
    ("completions", {"prompt": ""}, "Prompt 0 is empty"),
    ("completions", {"prompt": []}, "'prompt' must be"),
    ("completions", {"prompt": "x", "model": "gpt-4"}, "The model 'gpt-4' does not exist"),
    ("completions", {"prompt": "\u00e9t\u00e9"}, "is not in the character vocabulary"),
    ("chat/completions", {"messages": []}, "'messages' must be a non-empty list"),
    ("chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]},
     "unknown role 'wizard'"),
]


@pytest.mark.parametrize("path,body,words", BAD, ids=[b[2][:24] for b in BAD])
def test_bad_input_is_an_openai_error_and_the_server_goes_on(served, path, body, words):
  data = body if isinstance(body, str) else json.dumps({"model": "tiny", **body})
  r = httpx.post(f"{served.url}/v1/{path}", content=data, timeout=30)
  assert r.status_code == (404 if "does not exist" in words else 400)
  error = r.json()["error"]
  assert words in error["message"] and set(error) == {"message", "type", "param", "code"}
  assert served.client.completions.create(model="tiny", prompt="A", max_tokens=2).choices


def test_openai_client_raises_its_own_errors(served):
  with pytest.raises(openai.NotFoundError):
    served.client.completions.create(model="nope", prompt="A", max_tokens=2)
  with pytest.raises(openai.BadRequestError):
    served.client.completions.create(model="tiny", prompt="A", max_tokens=2, top_p=2)


def test_full_queue_answers_429_with_retry_after(served):
  engine = served.engine
  slow = [Request(prompt=[1] * 8, max_tokens=50, temperature=0)]
  tickets = [engine.submit(slow * 4, lambda e: None)]  # the four slots
  try:
    while engine.metrics.value("active_slots") < 4:
      time.sleep(0.01)
    tickets.append(engine.submit(slow * 8, lambda e: None))  # the queue
    with pytest.raises(openai.RateLimitError) as e:
      served.client.completions.create(model="tiny", prompt="A", max_tokens=2)
    assert e.value.response.headers["retry-after"] == "1"
  finally:
    for ticket in tickets:
      engine.cancel(ticket)
  time.sleep(0.5)
  assert served.client.completions.create(model="tiny", prompt="A", max_tokens=2).choices
  metrics = parse(httpx.get(f"{served.url}/metrics").text)
  assert metrics["flaxgpt_serve_active_slots"] == 0
  assert metrics['flaxgpt_serve_http_errors_total{status="429"}'] >= 1
