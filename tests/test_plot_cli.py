"""python -m launch.plot: train and validation loss curves of one or several runs as an image;
bad input is one sentence, exit 2, and no file."""

import json
import os


from conftest import exit_status, tiny_run_config
from launch import plot as plot_cli
from training.loop import train

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _fake_run(path, steps=40, val_every=10, batch_size=8, block_size=32):
  path.mkdir(parents=True)
  rows = [dict(step=s, loss=4.0 / s ** 0.3, lr=1e-3, grad_norm=1.0, tokens_per_sec=1.0,
               mfu=None, **({"val_loss": 4.2 / s ** 0.3} if s % val_every == 0 else {}))
          for s in range(1, steps + 1)]
  (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  (path / "config.json").write_text(json.dumps(
      {"train": {"batch_size": batch_size}, "model": {"block_size": block_size}}))
  return path


def _plot(capsys, *args):
  status = exit_status(plot_cli.main, list(map(str, args)))
  out = capsys.readouterr()
  return status, out.out, out.err


def _check_image(path):
  import matplotlib.image
  assert path.read_bytes()[:8] == PNG_SIGNATURE
  height, width = matplotlib.image.imread(path).shape[:2]
  assert (width, height) == (800, 500)


def test_one_trained_run(tmp_path, capsys, shakespeare_path):
  c = tiny_run_config(shakespeare_path, train__steps=6, log__every=1, eval__every=3,
                      checkpoint__every=100)
  train(c, str(tmp_path / "run"), quiet=True)
  out = tmp_path / "loss.png"
  status, stdout, err = _plot(capsys, tmp_path / "run", "--out", out)
  assert status == 0, err
  assert "1 run, 6 logged steps" in stdout
  _check_image(out)


def test_two_runs_against_tokens(tmp_path, capsys):
  a = _fake_run(tmp_path / "a")
  b = _fake_run(tmp_path / "b", steps=20, batch_size=16)
  out = tmp_path / "both.png"
  status, stdout, err = _plot(capsys, a, b, "--out", out, "--x", "tokens", "--title", "a vs b")
  assert status == 0, err
  assert "2 runs, 60 logged steps" in stdout
  _check_image(out)
  svg = tmp_path / "both.svg"
  assert _plot(capsys, a, b, "--out", svg)[0] == 0
  text = svg.read_text()
  assert "a train" in text and "b val" in text  # labelled (matplotlib writes text as glyphs
  # with the string in a comment)


def test_bad_inputs_write_nothing(tmp_path, capsys):
  a = _fake_run(tmp_path / "a")
  empty = tmp_path / "empty"
  empty.mkdir()
  no_config = _fake_run(tmp_path / "noconfig")
  os.remove(no_config / "config.json")
  cases = {
      "no-metrics": ([empty, "--out", tmp_path / "x.png"], "has no metrics"),
      "missing": ([tmp_path / "nowhere", "--out", tmp_path / "x.png"], "does not exist"),
      "extension": ([a, "--out", tmp_path / "x.txt"], "must end in .png, .svg, .pdf"),
      "folder": ([a, "--out", tmp_path / "no" / "x.png"], "does not exist"),
      "no-runs": (["--out", tmp_path / "x.png"], "Give at least one run folder"),
      "tokens-without-config": ([no_config, "--out", tmp_path / "x.png", "--x", "tokens"],
                                "needs each run's config.json"),
  }
  for name, (args, expected) in cases.items():
    status, _, err = _plot(capsys, *args)
    assert status == 2, name
    assert err.startswith("error: ") and err.count("\n") == 1 and expected in err, (name, err)
  assert not (tmp_path / "x.png").exists() and not (tmp_path / "x.txt").exists()
  assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]
