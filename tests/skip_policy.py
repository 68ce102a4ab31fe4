"""The suite's skip policy (a pytest plugin, loaded by tests/conftest.py): the summary lists
every skipped test with its reason, and with FLAXGPT_STRICT_SKIPS=1 (what .ci/run sets) a skip
whose reason ALLOWED_SKIPS does not name fails the run. Tests skip where a reference they
compare with (torch, transformers, ...) or a tool is missing, so that a developer's run without
them still works; CI installs them all, so there a skip means a check that did not happen."""

import os
import re

import pytest

STRICT_ENV = "FLAXGPT_STRICT_SKIPS"
# The skips a CI run may have: (the skip reason, a regular expression; why it is allowed).
ALLOWED_SKIPS = (
    (r"libtpu is not installed here and FLAXGPT_TPU_PYTHON is not set",
     "the TPU compiles need a python with jax[tpu] (.ci/run makes one where pip offers it)"),
    (r"cannot mount .* here", "the tmpfs tests mount a filesystem, which needs root"),
)


def skip_reason(report) -> str:
  """A skip report's reason ("Skipped: " dropped)."""
  longrepr = report.longrepr
  reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
  return reason.removeprefix("Skipped: ")


def allowed(reason: str) -> str | None:
  """Why the skip with this reason is allowed in CI, or None."""
  return next((why for pattern, why in ALLOWED_SKIPS if re.search(pattern, reason)), None)


def _skips(config) -> list[tuple[str, str]]:
  """(test or file, reason) of every skip of the run (xdist's controller sees its workers')."""
  reporter = config.pluginmanager.get_plugin("terminalreporter")
  reports = reporter.stats.get("skipped", []) if reporter else []
  return [(report.nodeid, skip_reason(report)) for report in reports
          if not hasattr(report, "wasxfail")]


def _strict() -> bool:
  return os.environ.get(STRICT_ENV, "") not in ("", "0")


def pytest_sessionfinish(session):
  if hasattr(session.config, "workerinput"):  # an xdist worker: the controller decides
    return
  bad = [s for s in _skips(session.config) if allowed(s[1]) is None]
  if _strict() and bad and session.exitstatus == pytest.ExitCode.OK:
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, config):
  if hasattr(config, "workerinput"):
    return
  skips = _skips(config)
  write = terminalreporter.write_line
  write(f"skipped: {len(skips)}" + (" (each skip fails the run unless ALLOWED_SKIPS in "
                                     "tests/skip_policy.py names it)" if _strict() else ""))
  for nodeid, reason in skips:
    why = allowed(reason)
    write(f"  {nodeid}: {reason}" + (f"  [allowed: {why}]" if why else
                                      "  [NOT ALLOWED]" if _strict() else ""))
