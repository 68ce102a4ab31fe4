"""training/data/: deterministic windows by (seed, split, index), the same global batch on any
number of processes, bin/text/tfds/synthetic sources, the packaged tiny shakespeare, prefetch,
errors. (launch.prepare's own flags and messages: test_prepare_cli.py.)"""

import hashlib
import json
import pickle
import re

import numpy as np
import pytest

from conftest import exit_status, run_module, subprocess_env
from launch import train as train_cli
from model.errors import NotFoundError, UserError
from model.tokenizer import get_tokenizer
from training import data
from training.data import text
from training.data.text import prepare_text, split_text


def make(cfg_updates, seq_len=8, batch=4, seed=0, process_index=0, process_count=1):
  cfg = data.default_data_config()
  cfg.update(cfg_updates)
  return data.make_source(cfg, seq_len=seq_len, global_batch_size=batch, seed=seed,
                          process_index=process_index, process_count=process_count)


@pytest.fixture(scope="module")
def shakespeare_bin(shakespeare_path, tmp_path_factory):
  """tiny shakespeare prepared with the char tokenizer by the CLI, in a subprocess."""
  out_dir = tmp_path_factory.mktemp("shakespeare_char")
  result = run_module("launch.prepare", f"--input={shakespeare_path}", "--tokenizer=char",
                      f"--out_dir={out_dir}", env=subprocess_env(), timeout=120)
  assert result.returncode == 0, result.stderr
  assert "1,003,854 train + 111,540 val tokens" in result.stdout
  assert "tokens/s" in result.stdout
  return out_dir


def test_default_config_fields():
  cfg = data.default_data_config()
  assert cfg.source == "text" and cfg.path == "" and cfg.tokenizer == "char"
  assert (cfg.tfds_name, cfg.tfds_train_split, cfg.tfds_val_split, cfg.tfds_text_key,
          cfg.tfds_data_dir) == ("tiny_shakespeare", "train", "validation", "text", "")
  assert (cfg.val_fraction, cfg.cache_dir, cfg.prefetch, cfg.vocab_size) == (0.1, "", 2, 50257)


def test_bin_source_on_prepared_shakespeare(shakespeare_bin, shakespeare_path):
  meta = json.loads((shakespeare_bin / "meta.json").read_text())
  assert (meta["train_tokens"], meta["val_tokens"], meta["vocab_size"]) == (1003854, 111540, 65)
  source = make({"source": "bin", "path": str(shakespeare_bin)}, seq_len=64, batch=6)
  assert source.vocab_size == 65 and source.local_batch_size == 6
  assert "1,003,854 train tokens" in source.describe() and "vocab 65 (char)" in source.describe()
  tokenizer = get_tokenizer("char", text=source.tokenizer["chars"])
  text = shakespeare_path.read_text()
  for split, base in (("train", 0), ("val", 1003854)):
    batch = source.get_batch(split, 3)
    assert batch.shape == (6, 65) and batch.dtype == np.int32
    for row, offset in zip(batch, source.offsets(split, 3)):
      assert tokenizer.decode(row) == text[base + offset:base + offset + 65]


def test_text_source_default_is_tiny_shakespeare(shakespeare_bin, shakespeare_path, tmp_path,
                                                 monkeypatch):
  monkeypatch.setenv("FLAXGPT_DATA_DIR", str(shakespeare_path.parent))
  text_source = make({"cache_dir": str(tmp_path)}, seed=5)
  bin_source = make({"source": "bin", "path": str(shakespeare_bin)}, seed=5)
  assert text_source.tokenizer == bin_source.tokenizer
  np.testing.assert_array_equal(text_source.get_batch("train", 7), bin_source.get_batch("train", 7))


def test_same_step_same_batch_other_step_other_batch(shakespeare_bin):
  cfg = {"source": "bin", "path": str(shakespeare_bin)}
  a, b = make(cfg, seed=1), make(cfg, seed=1)
  np.testing.assert_array_equal(a.get_batch("train", 10), b.get_batch("train", 10))
  np.testing.assert_array_equal(a.get_batch("val", 0), a.get_batch("val", 0))
  assert not np.array_equal(a.get_batch("train", 10), a.get_batch("train", 11))
  assert not np.array_equal(a.get_batch("train", 10), a.get_batch("val", 10))
  assert not np.array_equal(a.get_batch("train", 10), make(cfg, seed=2).get_batch("train", 10))


@pytest.mark.parametrize("source", ["bin", "synthetic"])
def test_global_batch_is_the_same_on_any_number_of_processes(shakespeare_bin, source):
  cfg = {"source": source, "path": str(shakespeare_bin), "vocab_size": 100}
  whole = make(cfg, batch=8).get_batch("train", 4)
  for count in (2, 4):
    parts = [make(cfg, batch=8, process_index=i, process_count=count).get_batch("train", 4)
             for i in range(count)]
    assert all(p.shape == (8 // count, 9) for p in parts)
    np.testing.assert_array_equal(np.concatenate(parts), whole)


def test_text_source_is_cached(small_text, tmp_path):
  cfg = {"path": str(small_text), "cache_dir": str(tmp_path / "cache")}
  first = make(cfg)
  bin_path = first.data_dir / "train.bin"
  mtime = bin_path.stat().st_mtime_ns
  second = make(cfg)
  assert second.data_dir == first.data_dir and bin_path.stat().st_mtime_ns == mtime
  np.testing.assert_array_equal(first.get_batch("train", 0), second.get_batch("train", 0))
  small_text.write_text(small_text.read_text() + "More text.\n")  # new size: new cache entry
  assert make(cfg).data_dir != first.data_dir


def test_gpt2_text_source_splits_like_nanogpt_and_joins_files(small_text, tmp_path):
  other = tmp_path / "other.txt"
  other.write_text("Second document.\n" * 30)
  tokenizer = get_tokenizer("gpt2")
  source = make({"path": f"{small_text},{other}", "tokenizer": "gpt2",
                 "cache_dir": str(tmp_path / "cache")}, seq_len=16)
  assert source.vocab_size == 50257 and source.tokenizer == {"name": "gpt2"}
  texts = [small_text.read_text(), other.read_text()]
  cut = int(sum(map(len, texts)) * 0.9)  # inside the second file
  expected_train = tokenizer.encode(texts[0]) + [50256] + tokenizer.encode(texts[1][:cut -
                                                                                   len(texts[0])])
  train = np.fromfile(source.data_dir / "train.bin", dtype=np.uint16)
  np.testing.assert_array_equal(train, expected_train)
  row, offset = source.get_batch("train", 0)[0], source.offsets("train", 0)[0]
  np.testing.assert_array_equal(row, expected_train[offset:offset + 17])


def test_chunked_bpe_encoding_equals_whole_text():
  tokenizer = get_tokenizer("gpt2")
  text = "Hello  world.\n\n  Indented line\nnext\n\n\nx y\n'tis it's\n12 34\n" * 40
  pieces = split_text(text, chunk_chars=64)
  assert len(pieces) > 10 and "".join(pieces) == text
  assert sum(tokenizer.encode_batch(pieces), []) == tokenizer.encode(text)


def test_tfds_source_under_mock_data(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  cfg = {"source": "tfds", "tfds_name": "tiny_shakespeare", "tokenizer": "gpt2",
         "cache_dir": str(tmp_path)}
  with tfds.testing.mock_data(num_examples=40):
    source = make(cfg, seq_len=16, batch=4)
    docs = [tfds.data_source("tiny_shakespeare", split="train")[i]["text"] for i in range(40)]
    again = make(cfg, seq_len=16, batch=4)
  tokenizer = get_tokenizer("gpt2")
  expected = sum((tokenizer.encode(d) + [50256] for d in docs), [])
  np.testing.assert_array_equal(np.fromfile(source.data_dir / "train.bin", np.uint16), expected)
  batch = source.get_batch("train", 2)
  assert batch.shape == (4, 17) and source.vocab_size == 50257
  np.testing.assert_array_equal(batch, again.get_batch("train", 2))
  assert "tfds tiny_shakespeare" in source.describe()


def test_synthetic_source():
  source = make({"source": "synthetic", "vocab_size": 50}, seq_len=32, batch=4, seed=3)
  batch = source.get_batch("train", 0)
  assert batch.shape == (4, 33) and batch.dtype == np.int32
  assert batch.min() >= 0 and batch.max() < 50 and len(np.unique(batch)) > 40
  assert source.vocab_size == 50 and source.tokenizer is None
  np.testing.assert_array_equal(batch, make({"source": "synthetic", "vocab_size": 50}, seq_len=32,
                                            seed=3).get_batch("train", 0))
  assert not np.array_equal(batch, source.get_batch("train", 1))


def test_prefetch_yields_get_batch_in_order():
  source = make({"source": "synthetic", "vocab_size": 100})
  got = list(data.prefetch(source, "train", 5, count=6, depth=2))
  assert len(got) == 6
  for i, batch in enumerate(got):
    np.testing.assert_array_equal(batch, source.get_batch("train", 5 + i))
  endless = data.prefetch(source, "val", 0)
  np.testing.assert_array_equal(next(endless), source.get_batch("val", 0))
  np.testing.assert_array_equal(next(endless), source.get_batch("val", 1))
  endless.close()
  assert len(list(data.prefetch(source, "train", 0, count=3, depth=0))) == 3


def test_prefetch_raises_errors_from_the_thread():
  source = make({"source": "synthetic", "vocab_size": 100})
  with pytest.raises(ValueError, match="Unknown split 'test'"):
    next(data.prefetch(source, "test", 0))


def test_nanogpt_meta_pkl_is_read(tmp_path):
  chars = sorted(set("hello world"))
  with open(tmp_path / "meta.pkl", "wb") as f:
    pickle.dump({"vocab_size": len(chars), "itos": dict(enumerate(chars)),
                 "stoi": {c: i for i, c in enumerate(chars)}}, f)
  for name in ("train", "val"):
    (np.arange(100) % len(chars)).astype(np.uint16).tofile(tmp_path / f"{name}.bin")
  source = make({"source": "bin", "path": str(tmp_path)})
  assert source.vocab_size == len(chars)
  assert source.tokenizer == {"name": "char", "chars": "".join(chars)}


def test_tiny_shakespeare_ships_with_the_package(monkeypatch):
  monkeypatch.delenv("FLAXGPT_DATA_DIR", raising=False)
  path = text.tiny_shakespeare_path()
  assert path == str(text.PACKAGED_SHAKESPEARE)
  with open(path, "rb") as f:
    assert hashlib.sha256(f.read()).hexdigest() == text.SHAKESPEARE_SHA256


def test_without_the_packaged_copy_tiny_shakespeare_is_downloaded_once_and_checked(
    shakespeare_path, tmp_path, monkeypatch):
  monkeypatch.delenv("FLAXGPT_DATA_DIR", raising=False)
  monkeypatch.setattr(text, "PACKAGED_SHAKESPEARE", tmp_path / "not-installed.txt")
  monkeypatch.setattr(text, "SHAKESPEARE_URL", shakespeare_path.as_uri())
  path = text.tiny_shakespeare_path(str(tmp_path))
  assert path == str(tmp_path / "tinyshakespeare.txt")
  assert open(path, "rb").read() == shakespeare_path.read_bytes()
  monkeypatch.setattr(text, "SHAKESPEARE_SHA256", "0" * 64)
  with pytest.raises(UserError, match="expected sha256"):
    text.tiny_shakespeare_path(str(tmp_path / "other"))


def test_missing_paths_are_named(tmp_path):
  missing = str(tmp_path / "nope.txt")
  with pytest.raises(NotFoundError, match="nope.txt"):
    make({"path": missing})
  with pytest.raises(NotFoundError, match="nothing-here"):
    make({"source": "bin", "path": str(tmp_path / "nothing-here")})
  with pytest.raises(NotFoundError, match=r"\*\.zzz"):
    make({"path": str(tmp_path / "*.zzz")})
  with pytest.raises(UserError, match="Unknown data source 'csv'"):
    make({"source": "csv"})


def test_batch_must_divide_by_process_count():
  with pytest.raises(UserError, match="6 must be a positive multiple of the process count 4"):
    make({"source": "synthetic"}, batch=6, process_count=4)


def test_seq_len_too_long_for_data(small_text, tmp_path):
  cfg = {"path": str(small_text), "cache_dir": str(tmp_path)}
  with pytest.raises(UserError, match=r"train\.bin' has 1,458 tokens, fewer than seq_len \+ 1 = "
                                      r"2,049"):
    make(cfg, seq_len=2048)
  with pytest.raises(UserError, match=r"val\.bin' has 162 tokens, fewer than seq_len \+ 1 = 201"):
    make(cfg, seq_len=200)


def test_prepare_leaves_old_files_when_it_fails_half_way(small_text, tmp_path, monkeypatch):
  out_dir = tmp_path / "out"
  prepare_text([str(small_text)], "char", out_dir, quiet=True)
  before = {p.name: p.read_bytes() for p in out_dir.iterdir()}
  calls = []

  def fail_on_second_piece(texts):
    calls.append(1)
    if len(calls) > 1:
      raise KeyboardInterrupt
    return [[0] * len(t) for t in texts]

  monkeypatch.setattr("model.tokenizer.CharTokenizer.encode_batch",
                      lambda self, texts: fail_on_second_piece(texts))
  with pytest.raises(KeyboardInterrupt):
    prepare_text([str(small_text)], "char", out_dir, quiet=True, force=True)
  assert {p.name: p.read_bytes() for p in out_dir.iterdir()} == before


def test_prepare_refuses_a_non_empty_directory_without_force(small_text, tmp_path):
  out_dir = tmp_path / "out"
  prepare_text([str(small_text)], "char", out_dir, quiet=True)
  (out_dir / "notes.txt").write_text("mine")
  before = {p.name: p.read_bytes() for p in out_dir.iterdir()}
  with pytest.raises(UserError, match=r"'.*out' is not empty \(it holds meta.json, notes.txt, "
                                      r"train.bin and 1 more\); .* or pass --force"):
    prepare_text([str(small_text)], "gpt2", out_dir, quiet=True)
  assert {p.name: p.read_bytes() for p in out_dir.iterdir()} == before
  meta = prepare_text([str(small_text)], "gpt2", out_dir, quiet=True, force=True)
  assert meta["tokenizer"] == {"name": "gpt2"} and (out_dir / "notes.txt").read_text() == "mine"
  prepare_text([str(small_text)], "char", tmp_path / "empty-is-fine", quiet=True)


# ---------------------------------------------------------------------------------------------
# meta.json and the token files are checked when a bin directory is opened


@pytest.fixture
def small_bin(small_text, tmp_path):
  """small_text prepared with the char tokenizer (1,458 train + 162 val tokens)."""
  out_dir = tmp_path / "small_bin"
  prepare_text([str(small_text)], "char", out_dir, quiet=True)
  return out_dir


def test_prepare_records_the_largest_token_id(small_bin):
  meta = json.loads((small_bin / "meta.json").read_text())
  ids = np.concatenate([np.fromfile(small_bin / f"{s}.bin", np.uint16) for s in ("train", "val")])
  assert meta["max_token_id"] == int(ids.max()) == meta["vocab_size"] - 1
  source = make({"source": "bin", "path": str(small_bin)})
  assert source.max_token_id == meta["max_token_id"]


def _edit_meta(data_dir, change):
  path = data_dir / "meta.json"
  meta = json.loads(path.read_text())
  change(meta)
  path.write_text(json.dumps(meta))
  return path


def _drop(*keys):
  return lambda m: [m.pop(k) for k in keys]


def _set(**values):
  return lambda m: m.update(values)


def _then(*changes):
  return lambda m: [c(m) for c in changes]


# The cases: a wrong dtype with the counts removed (trains on ids up to 4 million),
# dtype bogus, vocab_size missing or too small for the ids, and a few more ways to be wrong.
BAD_META = [
    ("uint32", _then(_set(dtype="uint32"), _drop("train_tokens", "val_tokens")),
     r"train.bin' holds id [\d,]{9}, beyond the data's max_token_id \d+ in meta.json; its dtype "
     r"\(uint32\) or vocabulary is wrong"),
    ("uint32-no-max", _then(_set(dtype="uint32"), _drop("train_tokens", "val_tokens",
                                                        "max_token_id")),
     r"train.bin' holds id [\d,]{9}, beyond the data's vocab_size \d+; its dtype \(uint32\)"),
    ("uint8", _then(_set(dtype="uint8"), _drop("train_tokens", "val_tokens")),
     r"meta.json has dtype 'uint8'; token files are uint16 or uint32"),
    ("float32", _then(_set(dtype="float32"), _drop("train_tokens", "val_tokens")),
     r"meta.json has dtype 'float32'; token files are uint16 or uint32"),
    ("bogus", _set(dtype="bogus"), r"meta.json has dtype 'bogus'; token files are uint16 or "),
    ("no-vocab", _drop("vocab_size"), r"meta.json has no vocab_size; it must give the vocabulary "
                                      r"size as a positive integer"),
    ("vocab-0", _set(vocab_size=0), r"meta.json has vocab_size 0; it must be a positive integer"),
    ("vocab-str", _set(vocab_size="65"), r"meta.json has vocab_size '65'; it must be a positive"),
    ("vocab-10", _set(vocab_size=10), r"meta.json has max_token_id \d+ but vocab_size 10; every "
                                      r"token id must be below vocab_size"),
    ("vocab-10-old", _then(_set(vocab_size=10), _drop("max_token_id")),
     r"meta.json has a character tokenizer of \d+ characters but vocab_size 10"),
    ("vocab-10-no-table", _then(_set(vocab_size=10, tokenizer={"name": "gpt2"}),
                                _drop("max_token_id")),
     r"train.bin' holds id \d+, beyond the data's vocab_size 10"),
    ("count", _set(train_tokens=5), r"train.bin' holds 1,458 tokens but meta.json says 5"),
    ("uint16-vocab-too-big", _set(dtype="uint16", vocab_size=70000, tokenizer={"name": "gpt2"}),
     r"has dtype uint16 for vocab_size 70,000, which needs ids up to 69,999; use uint32"),
]


@pytest.mark.parametrize("change, pattern", [c[1:] for c in BAD_META],
                         ids=[c[0] for c in BAD_META])
def test_bad_meta_json_is_one_sentence_exit_2(change, pattern, small_bin, tmp_path, capsys):
  """launch.train on the directory: one `error:` line naming the file, status 2, nothing run."""
  _edit_meta(small_bin, change)
  workdir = tmp_path / "run"
  status = exit_status(train_cli.main, [
      "--config", "configs/tiny.py", "--workdir", str(workdir), "--config.data.source=bin",
      f"--config.data.path={small_bin}", f"--config.data.cache_dir={tmp_path / 'cache'}"])
  err = capsys.readouterr().err
  assert status == 2 and err.startswith("error: ") and err.count("\n") == 1, err
  assert str(small_bin) in err and re.search(pattern, err), err
  assert not workdir.exists()


def test_without_max_token_id_the_ids_are_scanned_once(small_bin, tmp_path, monkeypatch):
  _edit_meta(small_bin, _drop("max_token_id"))
  cfg = {"source": "bin", "path": str(small_bin), "cache_dir": str(tmp_path / "cache")}
  assert make(cfg).max_token_id == json.loads((small_bin / "meta.json").read_text())[
      "vocab_size"] - 1
  cached = list((tmp_path / "cache" / "max_token_id").glob("*.json"))
  assert len(cached) == 2  # train.bin and val.bin
  monkeypatch.setattr(np.memmap, "max", lambda *a, **k: pytest.fail("scanned again"))
  assert make(cfg).max_token_id > 0


def test_model_vocabulary_must_hold_the_data_ids(small_bin, tmp_path, capsys):
  status = exit_status(train_cli.main, [
      "--config", "configs/tiny.py", "--workdir", str(tmp_path / "run"),
      "--config.data.source=bin", f"--config.data.path={small_bin}",
      "--config.model.vocab_size=10"])
  err = capsys.readouterr().err
  assert status == 2 and "config.model.vocab_size (10) is smaller than the data's vocabulary" in err
