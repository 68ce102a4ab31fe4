"""training/run.py: a config becomes a validated Run; every mistake is one UserError sentence
before anything is compiled, and the shipped configs are valid."""

import pathlib

import jax
import pytest

from configs import finetune_shakespeare, gpt2, gpt2_xl, shakespeare_char, tiny
from conftest import tiny_run_config
from model.config import LORA_FIELDS, field_names
from model.errors import UserError
from training.config_checks import check_values, cpu_device_count
from training.data import prepare_text
from training.run import build_run, check_same_tokenizer, model_config, vocab_size_without_data

CONFIGS = {"tiny": tiny, "shakespeare_char": shakespeare_char, "gpt2": gpt2, "gpt2_xl": gpt2_xl,
           "finetune_shakespeare": finetune_shakespeare}


def load_config(name, variant=None):
  module = CONFIGS[name]
  return module.get_config(variant) if variant else module.get_config()


def test_user_errors_before_compiling(tmp_path, shakespeare_path):
  c = tiny_run_config(shakespeare_path, train__batch_size=12, train__grad_accum=1)
  with pytest.raises(UserError, match="divisible by the data-parallel size"):
    build_run(c, workdir=tmp_path)  # mesh data=-1 is 8 devices here
  c = tiny_run_config(pathlib.Path("/no/such/file.txt"))
  with pytest.raises(UserError, match="does not exist"):
    build_run(c, workdir=tmp_path)
  c = tiny_run_config(shakespeare_path, mesh__data=3)
  with pytest.raises(UserError, match="mesh"):
    build_run(c, workdir=tmp_path)
  c = tiny_run_config(shakespeare_path)
  c.model.vocab_size = 10
  with pytest.raises(UserError, match="smaller than the data's vocabulary"):
    build_run(c, workdir=tmp_path)
  assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("name, variant", [("tiny", None), ("shakespeare_char", None),
                                           ("shakespeare_char", "cpu"), ("gpt2", None),
                                           ("gpt2_xl", None), ("finetune_shakespeare", None),
                                           ("finetune_shakespeare", "gpt2-xl")])
def test_configs_are_valid(name, variant):
  c = load_config(name, variant)
  check_values(c)
  # every ModelConfig field is a config key, but the LoRA ones (config.train.lora sets them)
  assert set(c.model.keys()) == set(field_names()) - set(LORA_FIELDS)
  cfg = model_config(c, data_vocab_size=65 if c.data.tokenizer == "char" else 50257)
  assert c.train.batch_size % c.train.grad_accum == 0
  if name == "gpt2":  # nanoGPT's ~0.5M tokens per step: 12 x 1024 x 40
    assert (c.train.batch_size // c.train.grad_accum, cfg.block_size, c.train.grad_accum) == (
        12, 1024, 40)
    assert cfg.padded_vocab_size == 50304 and cfg.dtype == "bfloat16"
    assert (c.optimizer.lr, c.optimizer.min_lr, c.optimizer.warmup_steps, c.train.steps) == (
        6e-4, 6e-5, 2000, 600_000)
  if name == "gpt2_xl":
    assert cfg.scan_layers and cfg.remat != "none" and c.mesh.fsdp == -1
  if (name, variant) == ("shakespeare_char", None):
    assert (cfg.num_layers, cfg.num_heads, cfg.d_model, cfg.block_size) == (6, 6, 384, 256)
    assert cfg.resid_dropout == 0.2 and not cfg.use_bias and c.eval.batches == 200
  if name == "finetune_shakespeare":  # nanoGPT's: 32 x 1024 tokens, lr 3e-5 constant, 20 steps
    assert c.init_from == (variant or "gpt2") and c.data.tokenizer == "gpt2"
    assert (c.train.batch_size, cfg.block_size, c.train.steps) == (32, 1024, 20)
    assert c.optimizer.lr == c.optimizer.min_lr == 3e-5 and c.optimizer.warmup_steps == 0
    # the weights give the shapes: the variants only name them
    assert c.model == finetune_shakespeare.get_config().model
  if variant == "cpu":  # nanoGPT's CPU quick start
    assert (cfg.num_layers, cfg.num_heads, cfg.d_model, cfg.block_size) == (4, 4, 128, 64)
    assert (c.train.batch_size, c.train.steps, c.eval.batches, cfg.resid_dropout) == (
        12, 2000, 20, 0.0)


def test_unknown_variant_is_a_clear_error():
  with pytest.raises(ValueError, match="Unknown variant 'gpu'"):
    load_config("shakespeare_char", "gpu")


def test_cpu_device_count():
  assert cpu_device_count(3, batch_size=12, cores=2) == 3  # as asked
  assert cpu_device_count(-1, batch_size=12, cores=2) == 2  # one per core
  assert cpu_device_count(-1, batch_size=12, cores=8) == 6  # ... dividing the batch
  assert cpu_device_count(-1, batch_size=7, cores=4) == 1
  assert cpu_device_count(-1, batch_size=4, cores=64) == 4


def test_vocabulary_without_reading_the_data(tmp_path, small_text):
  """What training's data would give, from the tokenizer or the metadata: no tokens read."""
  c = tiny.get_config()
  c.data.path = str(small_text)
  chars = len(set(small_text.read_text()))
  assert vocab_size_without_data(c) == (chars, f"the {chars} characters of {small_text}")
  assert build_run(c).model.vocab_size == chars  # what training reads
  c.data.tokenizer = "gpt2"
  assert vocab_size_without_data(c) == (50257, "GPT-2 BPE")
  c.data.source, c.data.tokenizer = "tfds", "char"
  with pytest.raises(UserError, match="config.model.vocab_size is unset and the character"):
    vocab_size_without_data(c)  # a tfds data set's characters: only known once read
  c.data.source, c.data.vocab_size = "synthetic", 300
  assert vocab_size_without_data(c)[0] == 300
  prepare_text([str(small_text)], "char", tmp_path / "bin")
  c.data.source, c.data.path = "bin", str(tmp_path / "bin")
  assert vocab_size_without_data(c) == (chars, f"{tmp_path / 'bin'}'s meta.json")
  c.model.vocab_size = 500
  assert vocab_size_without_data(c) == (500, "config.model.vocab_size")
  c.model.vocab_size, c.model.family, c.data.source = None, "bert", "synthetic"
  assert vocab_size_without_data(c, "mlm") == (304, "data.vocab_size (synthetic tokens) + 4 "
                                                    "special tokens")


def test_training_benchmark_and_aot_paths_reject_the_same_config(tmp_path):
  """read_data=False / explicit devices (the benchmark's and launch.aot's way) check the config
  exactly as training does."""
  c = tiny.get_config()
  c.data.source = "synthetic"
  c.train.batch_size = 12  # not divisible by the 8 data-parallel devices
  for kwargs in (dict(workdir=tmp_path / "run"), dict(), dict(read_data=False),
                 dict(devices=jax.devices(), read_data=False)):
    with pytest.raises(UserError, match="divisible by the data-parallel size mesh.data x "
                                        "mesh.fsdp = 8"):
      build_run(c, **kwargs)
  assert not (tmp_path / "run").exists()


def test_run_on_given_devices_resolves_the_config():
  c = tiny.get_config()
  c.data.source = "synthetic"
  c.mesh.data, c.mesh.fsdp = 2, -1
  run = build_run(c, devices=jax.devices()[:4], read_data=False)
  assert run.mesh_shape == (2, 2, 1, 1) and run.mesh.devices.size == 4
  assert (run.config.mesh.data, run.config.mesh.fsdp) == (2, 2)  # -1 resolved
  assert run.config.optimizer.decay_steps == c.train.steps and run.source is None
  assert run.model.vocab_size == c.data.vocab_size == 50257
  assert run.batch_shape == (8, 65) and run.tokens_per_step == 8 * 64
  embedding = run.abstract_state.params["wte"]["embedding"]
  assert embedding.sharding.mesh.shape == run.mesh.shape  # laid out on this run's mesh


# (int fields such as warmup_steps cannot hold nan: ConfigDict keeps their type.)
@pytest.mark.parametrize("key", ["optimizer.lr", "optimizer.eps", "optimizer.clip",
                                 "optimizer.weight_decay", "optimizer.min_lr", "optimizer.b1",
                                 "model.resid_dropout", "data.val_fraction"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_numbers_are_refused(key, value):
  c = tiny.get_config()
  section, name = key.split(".")
  c[section][name] = value
  with pytest.raises(UserError, match=rf"^config\.{key} must be a finite number, got "
                                      rf"{value!r}\.$"):
    check_values(c)


def test_resume_needs_the_same_tokenizer():
  where = "The checkpoint of step 5 in /w/checkpoints"
  char = {"name": "char", "chars": "abc"}
  check_same_tokenizer(char, dict(char), where)
  check_same_tokenizer(None, char, where)  # checkpoints from before tokenizers were saved
  with pytest.raises(UserError, match=rf"^{where} was trained with a 3-character table, but "
                                      r"the data here is read with GPT-2 BPE; use the same "
                                      r"data.tokenizer"):
    check_same_tokenizer(char, {"name": "gpt2"}, where)
  # Hugging Face tokenizers are compared by content, not by folder.
  hf = {"name": "hf", "path": "/a", "vocab_size": 300, "sha256": "1" * 64}
  check_same_tokenizer(hf, dict(hf, path="/b"), where)
  with pytest.raises(UserError, match=rf"^{where} was trained with the tokenizer of /a \(content "
                                      r"111111111111\), but the data here is read with the "
                                      r"tokenizer of /a \(content 222222222222\)"):
    check_same_tokenizer(hf, dict(hf, sha256="2" * 64), where)
  with pytest.raises(UserError, match=r"another character table than the data here has \(3 "
                                      r"characters there, 4 here; only here: 'd'\)"):
    check_same_tokenizer(char, {"name": "char", "chars": "abcd"}, where)
  with pytest.raises(UserError, match=r"\(only there: 'ab'; only here: 'xy'; id 0: 'a' there, "
                                      r"'c' here; id 1: 'b' there, 'x' here; id 2: 'c' there, "
                                      r"'y' here\)"):
    check_same_tokenizer(char, {"name": "char", "chars": "cxy"}, where)
