"""A bounded load against any OpenAI-compatible server (behind `launch.loadgen`).

    spec = LoadSpec(requests=64, concurrency=16, rate=0, prompt_tokens=(32, 256),
                    output_tokens=(32, 128))
    run = asyncio.run(run_load("http://127.0.0.1:8000", "model", spec, prompts))
    report = summarize([run], spec)   # several runs of one spec: pooled

Requests are streamed completions (`stream_options.include_usage`) sent with at most
`concurrency` in flight; with `rate` > 0 their start times follow a Poisson process of that
many requests per second (exponential gaps), else each starts as soon as a slot in the
concurrency allows. Prompt and output lengths are drawn uniformly from the given inclusive
ranges by a seeded generator (the same requests for every server); the prompts are windows of
tiny shakespeare of that many GPT-2 tokens (`make_prompts`). Every request asks for its full
output length (temperature 0); a server may stop earlier at an end-of-text token, which the
report's output tokens count as they come. `time_limit` bounds the run: requests not started by
then are not sent, those running are cancelled and counted as errors.

Reported per request: time to first token (TTFT), inter-token latency (ITL: (end - first
token) / (output tokens - 1), the mean gap between its tokens) and end-to-end latency; their
p50 / p90 / p99, requests/s and output tokens/s over the run's wall time, and errors.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from typing import Any, Sequence

import numpy as np

from model.errors import UserError


@dataclasses.dataclass(frozen=True)
class LoadSpec:
  requests: int = 64
  concurrency: int = 16
  rate: float = 0.0                           # requests/s (Poisson); 0: as fast as allowed
  prompt_tokens: tuple[int, int] = (32, 256)  # inclusive range, uniform
  output_tokens: tuple[int, int] = (32, 128)  # inclusive range, uniform
  seed: int = 0
  time_limit: float = 600.0                   # seconds

  def check(self) -> None:
    if self.requests < 1 or self.concurrency < 1:
      raise UserError(f"requests and concurrency must be >= 1, got {self.requests} and "
                      f"{self.concurrency}.")
    for name in ("prompt_tokens", "output_tokens"):
      lo, hi = getattr(self, name)
      if not 1 <= lo <= hi:
        raise UserError(f"{name} must be a range LO,HI with 1 <= LO <= HI, got {lo},{hi}.")
    if self.rate < 0 or self.time_limit <= 0:
      raise UserError(f"rate must be >= 0 and time_limit > 0, got {self.rate} and "
                      f"{self.time_limit}.")


def make_prompts(spec: LoadSpec, tokenizer, text: str) -> list[tuple[str, int]]:
  """(prompt text, max_tokens) of each request: windows of `text` of the drawn lengths in
  `tokenizer`'s tokens (decoded to text: a server re-encodes them, which may differ by a token
  at the edges)."""
  rng = np.random.default_rng(spec.seed)
  ids = tokenizer.encode(text[:200_000])
  out = []
  for _ in range(spec.requests):
    n = int(rng.integers(spec.prompt_tokens[0], spec.prompt_tokens[1] + 1))
    start = int(rng.integers(0, len(ids) - n))
    out.append((tokenizer.decode(ids[start:start + n]),
                int(rng.integers(spec.output_tokens[0], spec.output_tokens[1] + 1))))
  return out


@dataclasses.dataclass
class Outcome:
  ok: bool
  ttft: float = 0.0
  end: float = 0.0
  tokens: int = 0
  error: str = ""


async def _one(client, url: str, model: str, prompt: str, max_tokens: int) -> Outcome:
  body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
          "stream": True, "stream_options": {"include_usage": True}}
  start = time.perf_counter()
  first, tokens, pieces = None, None, 0
  try:
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
      if r.status_code != 200:
        return Outcome(False, error=f"HTTP {r.status_code}")
      async for line in r.aiter_lines():
        if not line.startswith("data: {"):
          continue
        chunk = json.loads(line[6:])
        if chunk.get("usage"):
          tokens = chunk["usage"]["completion_tokens"]
        if any(c.get("text") for c in chunk.get("choices") or ()):
          pieces += 1
          if first is None:
            first = time.perf_counter() - start
  except Exception as e:  # pylint: disable=broad-except  (counted, the run goes on)
    return Outcome(False, error=type(e).__name__)
  end = time.perf_counter() - start
  tokens = pieces if tokens is None else tokens
  return Outcome(first is not None, first or 0.0, end, tokens, "" if first else "no tokens")


@dataclasses.dataclass
class Run:
  """One bounded load against one server: each request's outcome and the run's wall time."""
  outcomes: list[Outcome]
  wall: float


async def run_load(url: str, model: str, spec: LoadSpec, prompts: list[tuple[str, int]]) -> Run:
  """The load of the module docstring against `url` (summarize() turns runs into a report)."""
  import httpx  # pylint: disable=import-outside-toplevel
  spec.check()
  rng = np.random.default_rng(spec.seed + 1)
  gaps = rng.exponential(1 / spec.rate, spec.requests) if spec.rate > 0 else np.zeros(
      spec.requests)
  gate = asyncio.Semaphore(spec.concurrency)
  limits = httpx.Limits(max_connections=spec.concurrency + 4)
  outcomes: list[Outcome] = []
  start = time.perf_counter()
  deadline = start + spec.time_limit

  async with httpx.AsyncClient(timeout=httpx.Timeout(spec.time_limit), limits=limits) as client:
    async def go(prompt, max_tokens):
      async with gate:
        if time.perf_counter() < deadline:
          outcomes.append(await _one(client, url, model, prompt, max_tokens))

    tasks, at = [], start
    for (prompt, max_tokens), gap in zip(prompts, gaps):
      at += gap
      await asyncio.sleep(max(0.0, at - time.perf_counter()))
      if time.perf_counter() >= deadline:
        break
      tasks.append(asyncio.create_task(go(prompt, max_tokens)))
    _, pending = await asyncio.wait(tasks, timeout=max(0.0, deadline - time.perf_counter())
                                    ) if tasks else (set(), set())
    for task in pending:
      task.cancel()
      outcomes.append(Outcome(False, error="time limit"))
  return Run(outcomes, time.perf_counter() - start)


def _pct(values: list[float]) -> dict[str, float | None]:
  if not values:
    return {"p50": None, "p90": None, "p99": None}
  return {f"p{q}": float(np.percentile(values, q)) for q in (50, 90, 99)}


def summarize(runs: Sequence[Run], spec: LoadSpec) -> dict[str, Any]:
  """The report of one or more runs of `spec` against one server, pooled: requests and tokens
  over the runs' summed wall time, percentiles over every request; `rounds` has each run's
  output tokens/s (how much the rounds of a loaded machine differ)."""
  outcomes = [o for run in runs for o in run.outcomes]
  wall = sum(run.wall for run in runs)
  ok = [o for o in outcomes if o.ok]
  errors: dict[str, int] = {}
  for o in outcomes:
    if not o.ok:
      errors[o.error] = errors.get(o.error, 0) + 1
  tokens = sum(o.tokens for o in ok)
  return {
      "spec": dataclasses.asdict(spec), "wall_seconds": wall, "completed": len(ok),
      "errors": errors, "requests_per_sec": len(ok) / wall, "output_tokens": tokens,
      "output_tokens_per_sec": tokens / wall,
      "rounds": [sum(o.tokens for o in run.outcomes if o.ok) / run.wall for run in runs],
      "ttft_seconds": _pct([o.ttft for o in ok]),
      "itl_seconds": _pct([(o.end - o.ttft) / (o.tokens - 1) for o in ok if o.tokens > 1]),
      "e2e_seconds": _pct([o.end for o in ok]),
  }


def format_reports(reports: dict[str, dict[str, Any]]) -> str:
  """Side by side: one column per server (name -> report)."""
  names = list(reports)
  rows = [("completed", lambda r: f"{r['completed']}"),
          ("errors", lambda r: ", ".join(f"{k} {v}" for k, v in r["errors"].items()) or "0"),
          ("requests/s", lambda r: f"{r['requests_per_sec']:.2f}"),
          ("output tokens/s", lambda r: f"{r['output_tokens_per_sec']:.1f}"),
          ("  by round", lambda r: " ".join(f"{v:.1f}" for v in r["rounds"]))]
  for key, label in (("ttft_seconds", "TTFT"), ("itl_seconds", "ITL"),
                     ("e2e_seconds", "end-to-end")):
    for q in ("p50", "p90", "p99"):
      rows.append((f"{label} {q} (ms)", lambda r, k=key, q=q: "-" if r[k][q] is None
                   else f"{1000 * r[k][q]:.1f}"))
  width = max(14, *(len(n) + 2 for n in names))
  lines = [f"{'':<20}" + "".join(f"{n:>{width}}" for n in names)]
  for label, cell in rows:
    lines.append(f"{label:<20}" + "".join(f"{cell(reports[n]):>{width}}" for n in names))
  return "\n".join(lines)
