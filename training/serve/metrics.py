"""The serving engine's counters, gauges and latency histograms, as Prometheus text (`GET
/metrics`, exposition format 0.0.4).

    m = ServeMetrics()
    m.observe("time_to_first_token_seconds", 0.12); m.add("generated_tokens_total", 8)
    m.set("active_slots", 3); print(m.render())

Every name is prefixed `flaxgpt_serve_`; what each means is its HELP line (METRICS).
"""

from __future__ import annotations

import bisect
import math
import threading

PREFIX = "flaxgpt_serve_"
# Latency buckets (seconds): 1 ms to 2 minutes.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                   10.0, 30.0, 60.0, 120.0)

# name -> (type, help)
METRICS = {
    "queue_depth": ("gauge", "Sequences waiting for a slot."),
    "active_slots": ("gauge", "Slots decoding a sequence now."),
    "peak_active_slots": ("gauge", "The most slots decoding at once since the server started."),
    "slots": ("gauge", "Decode slots."),
    "requests_total": ("counter", "Sequences finished, by finish reason (stop, length, "
                                  "cancelled: the client went away)."),
    "prompt_tokens_total": ("counter", "Prompt tokens prefilled."),
    "generated_tokens_total": ("counter", "Tokens sampled and delivered."),
    "prefills_total": ("counter", "Prefill calls (one prompt each)."),
    "decode_calls_total": ("counter", "Decode calls (each advances every active slot several "
                                      "tokens)."),
    "compiles_after_warmup_total": ("counter", "Programs JAX lowered after the server was "
                                               "ready (0 unless something recompiles)."),
    "http_errors_total": ("counter", "Error responses, by HTTP status."),
    "time_to_first_token_seconds": ("histogram", "From a request's arrival to its first "
                                                 "token."),
    "inter_token_latency_seconds": ("histogram", "Between consecutive tokens of a sequence "
                                                 "(a delivery of n tokens counts n times its "
                                                 "gap / n)."),
    "request_latency_seconds": ("histogram", "From a request's arrival to its last token."),
}


class _Histogram:
  def __init__(self):
    self.counts = [0] * (len(LATENCY_BUCKETS) + 1)
    self.total = 0.0

  def observe(self, value: float, times: int = 1) -> None:
    self.counts[bisect.bisect_left(LATENCY_BUCKETS, value)] += times
    self.total += value * times


class ServeMetrics:
  """Thread-safe: the engine's thread writes, the HTTP thread renders."""

  def __init__(self):
    self._lock = threading.Lock()
    self._values: dict[tuple[str, tuple], float] = {}
    self._hists: dict[str, _Histogram] = {}

  def set(self, name: str, value: float, **labels) -> None:
    self._check(name, "gauge")
    with self._lock:
      self._values[(name, tuple(sorted(labels.items())))] = value

  def add(self, name: str, value: float = 1, **labels) -> None:
    self._check(name, "counter")
    key = (name, tuple(sorted(labels.items())))
    with self._lock:
      self._values[key] = self._values.get(key, 0) + value

  def observe(self, name: str, value: float, times: int = 1) -> None:
    self._check(name, "histogram")
    with self._lock:
      self._hists.setdefault(name, _Histogram()).observe(value, times)

  def value(self, name: str, **labels) -> float:
    with self._lock:
      return self._values.get((name, tuple(sorted(labels.items()))), 0)

  def count(self, name: str) -> int:
    """Observations of histogram `name`."""
    with self._lock:
      hist = self._hists.get(name)
      return sum(hist.counts) if hist else 0

  @staticmethod
  def _check(name: str, kind: str) -> None:
    if METRICS.get(name, (None,))[0] != kind:
      raise KeyError(f"{name!r} is not a {kind} of METRICS")

  def render(self) -> str:
    lines = []
    with self._lock:
      for name, (kind, help_text) in METRICS.items():
        full = PREFIX + name
        lines += [f"# HELP {full} {help_text}", f"# TYPE {full} {kind}"]
        if kind == "histogram":
          hist = self._hists.get(name, _Histogram())
          running = 0
          for bound, n in zip(LATENCY_BUCKETS + (math.inf,), hist.counts):
            running += n
            le = "+Inf" if bound == math.inf else repr(bound)
            lines.append(f'{full}_bucket{{le="{le}"}} {running}')
          lines += [f"{full}_sum {hist.total!r}", f"{full}_count {running}"]
          continue
        series = [(labels, v) for (n, labels), v in self._values.items() if n == name]
        for labels, v in sorted(series) or [((), 0)]:
          tags = ",".join(f'{k}="{val}"' for k, val in labels)
          lines.append(f"{full}{{{tags}}} {_number(v)}" if tags else f"{full} {_number(v)}")
    return "\n".join(lines) + "\n"


def _number(v: float) -> str:
  return str(int(v)) if float(v).is_integer() else repr(float(v))


def parse(text: str) -> dict[str, float]:
  """Prometheus text -> {"name{labels}": value} (for tests and the load generator)."""
  out = {}
  for line in text.splitlines():
    if line and not line.startswith("#"):
      name, _, value = line.rpartition(" ")
      out[name] = float(value)
  return out
