"""The HTTP surface over the engine: an OpenAI-compatible FastAPI app served by uvicorn.

    GET  /v1/models            the one model
    POST /v1/completions       text completions (training/serve/protocol.py says what it takes)
    POST /v1/chat/completions  chat, rendered with the model's chat template
    GET  /health               200 while serving, 503 while draining
    GET  /metrics              Prometheus text (training/serve/metrics.py)

    server = Server(engine, served, sock, grace=30)   # sock: a bound socket (port 0 works)
    server.run()                                      # until SIGTERM / SIGINT and the drain

Streams are server-sent events: one `data: {json}` chunk per engine delivery, then `data:
[DONE]`; with stream_options.include_usage a last chunk carries the usage. Errors are OpenAI's
shape with the status its client expects: 400 a bad request (malformed JSON, a wrong field),
404 an unknown model, 429 a full queue (with Retry-After), 503 while draining. A client that
goes away (a closed stream, a dropped connection) has its sequences cancelled: their slots are
free at the engine's next step.

The engine's thread hands events to the request's asyncio queue with call_soon_threadsafe
(JetStream's handoff). SIGTERM (or SIGINT) drains: new requests get 503, those in flight finish
within `grace` seconds (then they are cancelled), and `run` returns, so the process exits 0; a
second SIGINT stops at once.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from typing import Any, AsyncIterator, Callable

import uvicorn
from fastapi import FastAPI, Request as HttpRequest
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from model.errors import UserError
from training.serve import protocol as api
from training.serve.engine import Engine
from training.serve.requests import Done, Draining, Output, QueueFull

RETRY_AFTER_SECONDS = 1
DISCONNECT_POLL_SECONDS = 0.25


def create_app(engine: Engine, served: api.Served) -> FastAPI:
  app = FastAPI(title="flaxgpt", docs_url=None, redoc_url=None, openapi_url=None)

  def error(e: api.ApiError) -> JSONResponse:
    engine.metrics.add("http_errors_total", status=str(e.status))
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

  @app.exception_handler(api.ApiError)
  async def api_error(_request, e: api.ApiError):
    return error(e)

  @app.exception_handler(Exception)
  async def unexpected(_request, e: Exception):
    return error(api.ApiError(500, f"Internal error: {type(e).__name__}: {e}",
                              kind="server_error"))

  @app.get("/health")
  async def health():
    if engine.draining:
      return JSONResponse({"status": "draining"}, status_code=503)
    return {"status": "ok"}

  @app.get("/metrics")
  async def metrics():
    return PlainTextResponse(engine.metrics.render(),
                             media_type="text/plain; version=0.0.4; charset=utf-8")

  @app.get("/v1/models")
  async def models():
    return {"object": "list", "data": [{"id": served.model, "object": "model",
                                        "created": served.created, "owned_by": "flaxgpt"}]}

  @app.post("/v1/completions")
  async def completions(request: HttpRequest):
    return await _serve(engine, served, request, api.parse_completion(await _json(request),
                                                                      served))

  @app.post("/v1/chat/completions")
  async def chat(request: HttpRequest):
    return await _serve(engine, served, request, api.parse_chat(await _json(request), served))

  return app


async def _json(request: HttpRequest) -> Any:
  raw = await request.body()
  try:
    return json.loads(raw)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise api.ApiError(400, f"The request body is not valid JSON ({e}).") from None


async def _serve(engine: Engine, served: api.Served, http: HttpRequest, parsed: api.Parsed):
  loop = asyncio.get_running_loop()
  queue: asyncio.Queue = asyncio.Queue()
  try:
    ticket = engine.submit(parsed.requests,
                           lambda event: loop.call_soon_threadsafe(queue.put_nowait, event))
  except UserError as e:
    raise api.ApiError(400, str(e)) from None
  except QueueFull as e:
    raise api.ApiError(429, f"{e} Retry later.", kind="rate_limit_error",
                       code="rate_limit_exceeded",
                       headers={"Retry-After": str(RETRY_AFTER_SECONDS)}) from None
  except Draining as e:
    raise api.ApiError(503, str(e), kind="server_error", code="draining") from None
  if parsed.stream:
    return StreamingResponse(_sse(engine, served, parsed, queue, ticket),
                             media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
  choices = [_Choice() for _ in parsed.requests]
  remaining = len(choices)
  try:
    while remaining:
      try:
        event = await asyncio.wait_for(queue.get(), DISCONNECT_POLL_SECONDS)
      except asyncio.TimeoutError:
        if await http.is_disconnected():
          engine.cancel(ticket)
          return PlainTextResponse("", status_code=499)
        continue
      remaining -= choices[event.index].add(event)
  except asyncio.CancelledError:
    engine.cancel(ticket)
    raise
  return JSONResponse(_body(served, parsed, choices))


class _Choice:
  """One sequence's events, gathered."""

  def __init__(self):
    self.text, self.tokens, self.logprobs, self.prompt_logprobs = [], [], [], None
    self.done: Done | None = None

  def add(self, event) -> int:
    if isinstance(event, Output):
      self.text.append(event.text)
      self.tokens.extend(event.token_ids)
      self.logprobs.extend(event.logprobs or ())
      if event.prompt_logprobs is not None:
        self.prompt_logprobs = event.prompt_logprobs
      return 0
    self.done = event
    return 1


def _finish_reason(done: Done | None) -> str | None:
  if done is None:
    return None
  if done.finish_reason == "error":
    raise api.ApiError(500, "The engine failed while generating.", kind="server_error")
  return done.finish_reason


def _usage(parsed: api.Parsed, dones) -> dict[str, int]:
  prompt = sum(len(parsed.requests[p * parsed.n].prompt)
               for p in range(len(parsed.requests) // parsed.n))
  return api.usage(prompt, sum(d.completion_tokens for d in dones))


def _echo_entries(request, prompt_logprobs) -> list:
  return [request.prompt[0]] + list(prompt_logprobs[1:]) if prompt_logprobs else []


def _body(served: api.Served, parsed: api.Parsed, choices: list[_Choice]) -> dict:
  tok = served.tokenizer
  out = []
  for i, (request, c) in enumerate(zip(parsed.requests, choices)):
    text = "".join(c.text)
    reason = _finish_reason(c.done)
    if parsed.kind == "chat.completion":
      out.append({"index": i, "message": {"role": "assistant", "content": text},
                  "logprobs": api.chat_logprobs(tok, c.logprobs)
                  if parsed.logprobs is not None else None, "finish_reason": reason})
      continue
    prompt_text = parsed.prompt_texts[i // parsed.n] if parsed.echo else ""
    logprobs = None
    if parsed.logprobs is not None:
      logprobs = api.legacy_logprobs(tok, _echo_entries(request, c.prompt_logprobs)
                                     + c.logprobs)
    out.append({"index": i, "text": prompt_text + text, "logprobs": logprobs,
                "finish_reason": reason})
  return {"id": parsed.id, "object": parsed.kind, "created": parsed.created,
          "model": parsed.model, "choices": out,
          "usage": _usage(parsed, [c.done for c in choices])}


def _chunk(parsed: api.Parsed, choices: list[dict], usage=None) -> str:
  kind = "chat.completion.chunk" if parsed.kind == "chat.completion" else "text_completion"
  body = {"id": parsed.id, "object": kind, "created": parsed.created, "model": parsed.model,
          "choices": choices}
  if usage is not None:
    body["usage"] = usage
  return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


async def _sse(engine: Engine, served: api.Served, parsed: api.Parsed, queue: asyncio.Queue,
               ticket) -> AsyncIterator[str]:
  tok, chat = served.tokenizer, parsed.kind == "chat.completion"
  dones, started, offsets = {}, set(), [0] * len(parsed.requests)
  try:
    if chat:
      yield _chunk(parsed, [{"index": i, "delta": {"role": "assistant", "content": ""},
                             "logprobs": None, "finish_reason": None}
                            for i in range(len(parsed.requests))])
    while len(dones) < len(parsed.requests):
      event = await queue.get()
      i, request = event.index, parsed.requests[event.index]
      if isinstance(event, Done):
        dones[i] = event
        choice = {"index": i, "finish_reason": _finish_reason(event), "logprobs": None}
        yield _chunk(parsed, [choice | ({"delta": {}} if chat else {"text": ""})])
        continue
      text, entries = event.text, list(event.logprobs or ())
      if not chat and parsed.echo and i not in started:
        text = parsed.prompt_texts[i // parsed.n] + text
        entries = _echo_entries(request, event.prompt_logprobs) + entries
      started.add(i)
      if not text and not entries:
        continue
      if chat:
        choice = {"index": i, "delta": {"content": text}, "finish_reason": None,
                  "logprobs": api.chat_logprobs(tok, entries)
                  if parsed.logprobs is not None else None}
      else:
        logprobs = None
        if parsed.logprobs is not None:
          logprobs = api.legacy_logprobs(tok, entries, offsets[i])
        offsets[i] += len(text)
        choice = {"index": i, "text": text, "logprobs": logprobs, "finish_reason": None}
      yield _chunk(parsed, [choice])
    if parsed.include_usage:
      yield _chunk(parsed, [], usage=_usage(parsed, dones.values()))
    yield "data: [DONE]\n\n"
  finally:
    if len(dones) < len(parsed.requests):  # the client went away (or the server stops)
      engine.cancel(ticket)


class Server(uvicorn.Server):
  """uvicorn on a bound socket, with SIGTERM / SIGINT draining the engine (module docstring);
  `on_ready` is called once the port accepts connections."""

  def __init__(self, engine: Engine, served: api.Served, sock, *, grace: float = 30.0,
               on_ready: Callable[[], None] | None = None, log_level: str = "warning"):
    config = uvicorn.Config(create_app(engine, served), log_level=log_level, access_log=False,
                            timeout_graceful_shutdown=2, lifespan="off")
    super().__init__(config)
    self.engine, self.sock, self.grace, self.on_ready = engine, sock, grace, on_ready
    self.drain_deadline: float | None = None

  def run(self, sockets=None) -> None:  # pylint: disable=arguments-differ
    super().run(sockets=[self.sock])

  async def startup(self, sockets=None) -> None:
    await super().startup(sockets=sockets)
    if self.on_ready is not None and not self.should_exit:
      self.on_ready()

  def handle_exit(self, sig: int, frame) -> None:
    if self.drain_deadline is not None and sig == signal.SIGINT:
      self.force_exit = self.should_exit = True
      return
    self.drain()

  def drain(self) -> None:
    """Stop taking requests; exit once those in flight are done or `grace` has passed."""
    if self.drain_deadline is None:
      self.engine.drain()
      self.drain_deadline = time.monotonic() + self.grace

  async def on_tick(self, counter: int) -> bool:
    if self.drain_deadline is not None and (
        self.engine.idle or time.monotonic() > self.drain_deadline):
      self.should_exit = True
    return await super().on_tick(counter)
