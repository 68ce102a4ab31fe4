"""Hugging Face PEFT adapters in and out (model/hf/peft.py): PEFT's LoRA adapters on tiny random
GPT-2 and Llama models, their B matrices non-zero, read through init_from (training/weights.py)
give PeftModel's logits; a LoRA run exported is what PeftModel.from_pretrained loads, and
--merge is merge_and_unload(); adapters this project cannot compute exactly are one sentence."""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import built_once, exit_status
from launch import eval as eval_cli
from launch import export as export_cli
from launch import train as train_cli
from model.gpt import GPT
from training.weights import load_weights

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures"
TOKENS = np.array([[1, 5, 9, 3, 7, 2, 11, 4, 60, 31, 17, 8]])
LLAMA_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTERS = {  # fixture, PEFT's target_modules
    "gpt2": ("hf_gpt2_tiny", ["c_attn", "c_proj", "c_fc"]),  # Conv1D: fan_in_fan_out
    "llama-gqa": ("hf_llama_gqa", LLAMA_ALL),  # c_q, and parts k / v of c_kv
    "llama-mha": ("hf_llama_mha", ["q_proj", "v_proj"]),  # parts q / v of the fused c_attn
    # a mixture of experts: attention only (the experts take no adapters)
    "mixtral": ("hf_mixtral", ["q_proj", "k_proj", "v_proj", "o_proj"]),
}


@pytest.fixture(scope="module")
def peft_lib(transformers_lib):
  return (*transformers_lib, pytest.importorskip("peft"))


def _ours(weights, n_vocab):
  logits = jax.jit(lambda p: GPT(weights.cfg).apply({"params": p}, jnp.asarray(TOKENS)))(
      weights.params)
  return np.asarray(logits)[..., :n_vocab]


def _peft_logits(peft_lib, base_dir, adapter_dir):
  torch, transformers, peft = peft_lib
  base = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
  model = peft.PeftModel.from_pretrained(base, str(adapter_dir)).eval()
  with torch.no_grad():
    return model, model(torch.tensor(TOKENS)).logits.numpy()


@pytest.mark.parametrize("case", list(ADAPTERS))
def test_peft_adapter_through_init_from_gives_peftmodels_logits(peft_lib, tmp_path, case):
  torch, transformers, peft = peft_lib
  fixture, targets = ADAPTERS[case]
  base = transformers.AutoModelForCausalLM.from_pretrained(FIXTURES / fixture,
                                                           dtype=torch.float32)
  model = peft.get_peft_model(base, peft.LoraConfig(
      r=4, lora_alpha=8, target_modules=targets, fan_in_fan_out=case == "gpt2"))
  torch.manual_seed(0)
  for name, p in model.named_parameters():
    if "lora_B" in name:
      torch.nn.init.normal_(p, std=0.1)  # a trained adapter: B is not zero
  model.save_pretrained(tmp_path / "adapter")
  with torch.no_grad():
    expected = model.eval()(torch.tensor(TOKENS)).logits.numpy()
    plain = model.get_base_model()
    with model.disable_adapter():
      base_logits = plain(torch.tensor(TOKENS)).logits.numpy()
  w = load_weights(tmp_path / "adapter")
  assert w.cfg.lora_rank == 4 and w.cfg.lora_alpha == 8
  np.testing.assert_allclose(_ours(w, expected.shape[-1]), expected, rtol=1e-5, atol=1e-5)
  assert np.max(np.abs(expected - base_logits)) > 1e-2  # the adapter matters


@pytest.fixture(scope="module")
def lora_runs(tmp_path_factory):
  """LoRA runs of GPT-2's fixture (parts q, v of c_attn and the MLP's c_fc) and of the GQA
  Llama's (every projection, its own tokenizer), 3 steps each, made once."""
  def run(base, targets, *extra):
    def build(workdir):
      status = exit_status(train_cli.main, [
          "--config", "configs/tiny.py", "--workdir", str(workdir), "--quiet",
          f"--config.init_from={FIXTURES / base}", "--config.model.block_size=16",
          "--config.train.steps=3", "--config.train.lora.rank=4",
          f"--config.train.lora.targets={targets}", "--config.optimizer.lr=3e-2",
          "--config.optimizer.warmup_steps=0", "--config.eval.every=0", *extra])
      assert status == 0
    return built_once(f"peft_{base}", build)
  return {"gpt2": (run("hf_gpt2_tiny", "q,v,c_fc"), "hf_gpt2_tiny"),
          "llama": (run("hf_llama_gqa", "q,k,v,o,gate,up,down",
                        f"--config.data.tokenizer=hf:{FIXTURES / 'hf_llama_gqa'}"),
                    "hf_llama_gqa")}


@pytest.mark.slow
@pytest.mark.parametrize("case", ["gpt2", "llama"])
def test_lora_run_exports_what_peft_loads_and_merges(peft_lib, lora_runs, tmp_path, case):
  """launch.export: a PEFT adapter directory whose PeftModel gives the run's logits; --merge:
  the weights merge_and_unload() gives (and so its logits)."""
  torch, transformers, _ = peft_lib
  workdir, base = lora_runs[case]
  adapter, merged = tmp_path / "adapter", tmp_path / "merged"
  assert exit_status(export_cli.main, ["--workdir", str(workdir), "--out", str(adapter)]) == 0
  config = json.loads((adapter / "adapter_config.json").read_text())
  assert config["base_model_name_or_path"] == str(FIXTURES / base)
  assert config["fan_in_fan_out"] is (case == "gpt2")
  model, expected = _peft_logits(peft_lib, FIXTURES / base, adapter)
  np.testing.assert_allclose(_ours(load_weights(workdir), expected.shape[-1]), expected,
                             rtol=1e-5, atol=1e-5)
  assert exit_status(export_cli.main, ["--workdir", str(workdir), "--out", str(merged),
                                       "--merge"]) == 0
  unloaded = model.merge_and_unload().state_dict()
  ours = transformers.AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
  compared = 0
  for name, value in ours.state_dict().items():
    if "wpe" in name:  # the run's 16 positions of the fixture's 32
      np.testing.assert_array_equal(value.numpy(), unloaded[name].numpy()[:16])
      continue
    np.testing.assert_allclose(value.numpy(), unloaded[name].numpy(), rtol=1e-5, atol=1e-6)
    compared += 1
  assert compared > 10


def _adapter_dir(tmp_path, **changes):
  """An adapter directory for GPT-2's fixture with `changes` to a plain LoRA config (the
  config is read before any tensor)."""
  path = tmp_path / "adapter"
  path.mkdir()
  config = {"peft_type": "LORA", "base_model_name_or_path": str(FIXTURES / "hf_gpt2_tiny"),
            "r": 4, "lora_alpha": 8, "target_modules": ["c_attn"], "fan_in_fan_out": True,
            "bias": "none", "use_dora": False, "modules_to_save": None, **changes}
  (path / "adapter_config.json").write_text(json.dumps(config))
  return path


@pytest.mark.parametrize("changes, expected", [
    ({"use_dora": True}, "DoRA (use_dora) = True is not supported"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save = ['lm_head'] is not supported"),
    ({"peft_type": "IA3"}, "adapter type 'IA3' is not supported; only LoRA adapters"),
    ({"use_rslora": True}, "rsLoRA (use_rslora) = True is not supported"),
])
def test_unsupported_peft_adapters_are_one_sentence(tmp_path, capsys, changes, expected):
  adapter = _adapter_dir(tmp_path, **changes)
  status = exit_status(eval_cli.main, ["--init_from", str(adapter), "--data",
                                       f"text:{FIXTURES.parent / 'conftest.py'}"])
  err = capsys.readouterr().err.strip().splitlines()
  assert status == 2
  assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err
