"""README.md, CONTRIBUTING.md and docs/ say what the code does: docs/configuration.md is what
docs/make_configuration.py makes from the code today, and every command, flag, config key,
config file, path and name those files mention exists, with README's measured
figures dated (tests/docs_check.py). The stale texts below show that each check fails."""

import importlib.util
import re

import pytest

import docs_check
from conftest import REPO
from model.config import LORA_FIELDS, field_names


def _generator():
  spec = importlib.util.spec_from_file_location("make_configuration",
                                                REPO / "docs" / "make_configuration.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_configuration_reference_is_what_the_code_makes():
  generator = _generator()
  written = (REPO / "docs" / "configuration.md").read_text()
  if written != generator.render():
    pytest.fail("docs/configuration.md is out of date with the code (a config key or its "
                f"comment changed); run `{generator.REGENERATE}` and commit the result.")


def test_configuration_reference_lists_exactly_the_keys_of_the_code():
  from configs.common import base_config
  rows = re.findall(r"^\| `([\w.]+)` \|", (REPO / "docs" / "configuration.md").read_text(), re.M)
  base = base_config()
  assert len(rows) == len(set(rows))
  assert all(docs_check._has_key(base, key) for key in rows if key != "init_from")
  # the LoRA fields are set from train.lora (its rows), not as model keys
  assert {k.removeprefix("model.") for k in rows if k.startswith("model.")} == (
      set(field_names()) - set(LORA_FIELDS))
  assert {k for k in rows if k.startswith("data.")} == {f"data.{k}" for k in base.data.keys()}


def test_a_key_without_a_comment_fails_with_how_to_regenerate(monkeypatch):
  generator = _generator()
  make_base = generator.common.base_config

  def with_a_new_key():
    config = make_base()
    config.train.new_knob = 3
    return config

  monkeypatch.setattr(generator.common, "base_config", with_a_new_key)
  with pytest.raises(generator.UndocumentedKey,
                     match=r"train\.new_knob \(in configs/common\.py\).*"
                           r"python docs/make_configuration\.py"):
    generator.render()


@pytest.mark.parametrize("path", ["README.md", "CONTRIBUTING.md"] + sorted(
    str(p.relative_to(REPO)) for p in (REPO / "docs").glob("*.md")))
def test_readme_and_docs_agree_with_the_code(path):
  problems = docs_check.problems((REPO / path).read_text(), path,
                                 figures=path == "README.md")
  assert not problems, "\n".join(problems)


GOOD = """\
Train (2 vCPUs of an Intel Xeon, 2026-12-05: 2m04s, 14.2k tok/s):

```bash
python -m launch.train --config configs/shakespeare_char.py:cpu --workdir runs/x \\
    --config.train.steps=10
python -m launch.sample --workdir runs/x --num_beams 4 --noquiet  # a comment --not_a_flag
```

| what | ours |
| --- | --- |
| step on one H200, 2026-12-04 | 31.6 ms/step |

See `model/config.py`, `train.loss_chunk`, `data.tokenizer=hf:DIR`, `model.hf.load_hf`,
`launch.aot`, `--window_shift` and `--config.mesh.cpu_devices=-1`; 16 bytes per parameter.
"""


def test_a_true_text_has_no_problems():
  assert docs_check.problems(GOOD) == []


@pytest.mark.parametrize("stale, expected", [
    # a flag the entry point does not define (launch.sample's is --num_beams)
    ("python -m launch.sample --workdir runs/x --beams 4", "launch.sample has no flag --beams"),
    # a flag on an indented continuation line of a synopsis
    ("```\npython -m launch.eval --workdir DIR\n    [--strides N]\n```",
     "launch.eval has no flag --strides"),
    # a config key the command's config does not have
    ("`python -m launch.train --config configs/tiny.py --workdir w --config.train.batchsize=4`",
     "no key 'train.batchsize' in configs/tiny.py"),
    ("python -m launch.train --config=configs/tiny.py --workdir w \\\n  --config.model.n_layer=2",
     "no key 'model.n_layer'"),
    # an entry point that does not exist
    ("python -m launch.server --port 8000", "launch/server.py is not an entry point"),
    # a config file or a variant that does not exist
    ("python -m launch.train --config configs/gpt2_small.py --workdir w",
     "configs/gpt2_small.py does not exist"),
    ("`configs/shakespeare_char.py:gpu`", "configs/shakespeare_char.py:gpu is not a variant"),
    # a repository path that does not exist
    ("`tests/test_multiprocess.py` checks two processes.",
     "tests/test_multiprocess.py does not exist"),
    ("the table in `training/tpu/slice.py`", "training/tpu/slice.py does not exist"),
    # a config key or a Python name in prose that does not exist
    ("Set `train.loss_chunks` to save memory.", "`train.loss_chunks`: neither"),
    ("`model.hf.load_hf_gpt3(DIR)` reads it.", "`model.hf.load_hf_gpt3(DIR)`: neither"),
    ("Pass `--window_shifts 4`.", "`--window_shifts 4`: no entry point has this flag"),
    ("Pass `--config.mesh.cpu_device=-1`.", "`--config.mesh.cpu_device=-1`: no such config key"),
    ("`launch.sampler` prints it.", "launch/sampler.py does not exist"),
    # measured figures without a machine or a date
    ("One device per core is ~1.5x faster on 2 cores.", "1.5x without a machine and a date"),
    ("On an H200 the step takes 31.6 ms.", "31.6 ms without a machine and a date"),
    ("On 2026-12-04 the step took 31.6 ms.", "31.6 ms without a machine and a date"),
    ("| config | memory |\n| --- | --- |\n| SmolLM2 decode | 2.51 GiB of 16 |",
     "2.51 GiB without a machine and a date in its row"),
    ("It printed:\n\n```\ndone: 2m02s in all, 14.2k tok/s\n```",
     "without a machine and a date in the same paragraph (or the one above the code block)"),
])
def test_a_stale_text_fails_naming_what_is_stale(stale, expected):
  problems = docs_check.problems(stale, "STALE.md")
  assert any(expected in p for p in problems), problems
