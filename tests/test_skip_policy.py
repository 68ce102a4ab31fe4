"""tests/skip_policy.py on a small suite of its own, run by pytest in a subprocess (the behaviour
is a pytest run's summary and exit status): a skip for a missing module fails the run under
FLAXGPT_STRICT_SKIPS=1 (what .ci/run sets), with xdist's workers too; a declared skip does not;
without the variable nothing fails; the summary lists every skip with its reason."""

import os
import subprocess
import sys

from conftest import REPO
import skip_policy

SUITE = {
    "test_fine.py": "def test_fine():\n  assert True\n",
    "test_allowed.py": ("import pytest\n\ndef test_tmpfs():\n"
                        "  pytest.skip('cannot mount a 64k tmpfs here: permission denied')\n"),
    "test_missing.py": ("import pytest\n\nlib = pytest.importorskip('flaxgpt_no_such_module')\n\n"
                        "def test_needs_it():\n  assert lib\n"),
}


def _pytest(tmp_path, files, strict: bool, *args):
  for name in files:
    (tmp_path / name).write_text(SUITE[name])
  env = {k: v for k, v in os.environ.items() if k != skip_policy.STRICT_ENV}
  env.update(PYTHONPATH=str(REPO / "tests"), **({skip_policy.STRICT_ENV: "1"} if strict else {}))
  return subprocess.run([sys.executable, "-m", "pytest", "-p", "skip_policy", "-p",
                         "no:cacheprovider", "-q", "--rootdir", str(tmp_path), *args,
                         str(tmp_path)], cwd=tmp_path, env=env, capture_output=True, text=True,
                        timeout=120, check=False)


def test_a_skip_outside_the_list_fails_a_strict_run(tmp_path):
  out = _pytest(tmp_path, SUITE, True, "-n", "2")  # the skips seen by xdist's controller
  assert out.returncode == 1, out.stdout + out.stderr
  assert "skipped: 2" in out.stdout
  assert ("test_missing.py: could not import 'flaxgpt_no_such_module': No module named "
          "'flaxgpt_no_such_module'  [NOT ALLOWED]") in out.stdout, out.stdout
  assert ("test_allowed.py::test_tmpfs: cannot mount a 64k tmpfs here: permission denied  "
          "[allowed: the tmpfs tests mount a filesystem, which needs root]") in out.stdout


def test_declared_skips_pass_and_a_local_run_lists_its_skips(tmp_path):
  allowed = _pytest(tmp_path, ["test_fine.py", "test_allowed.py"], True, "-n", "0")
  assert allowed.returncode == 0, allowed.stdout + allowed.stderr
  assert "skipped: 1" in allowed.stdout
  local = _pytest(tmp_path, SUITE, False, "-n", "0")
  assert local.returncode == 0, local.stdout + local.stderr
  assert "skipped: 2" in local.stdout and "flaxgpt_no_such_module" in local.stdout
  assert "NOT ALLOWED" not in local.stdout
