"""DPO (training/dpo.py) against TRL's DPOTrainer: on a fixed batch of a PEFT-adapted tiny
GPT-2 (B non-zero), the loss and the six metrics TRL logs, for the sigmoid, robust (label
smoothed) and IPO losses, and cDPO as TRL's sigmoid of the pairs and of the pairs flipped; the
reference with LoRA is the base model exactly; preference data's
bad lines."""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import exit_status
from launch import train as train_cli
from model import lora
from training.dpo import (TRL_METRICS, DPOSettings, dpo_loss_and_metrics, pairs, reference_logps,
                          sequence_logps)
from training.weights import load_weights

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures"
BASE = FIXTURES / "hf_gpt2_tiny"  # 96 tokens, 32 positions
EXAMPLES = [  # token ids: prompts and completions of different lengths
    {"prompt_ids": [5, 17, 33], "chosen_ids": [40, 41, 7, 9], "rejected_ids": [12, 60]},
    {"prompt_ids": [70], "chosen_ids": [3, 4, 5], "rejected_ids": [88, 1, 2, 90, 14]},
    {"prompt_ids": [21, 22, 23, 24, 25], "chosen_ids": [26], "rejected_ids": [11, 27]},
    {"prompt_ids": [8, 9], "chosen_ids": [30, 31, 32, 33, 34, 35], "rejected_ids": [36, 37]},
]
T = 31  # rows of 32 = T + 1 tokens


def _preference_batch():
  """Our layout: pairs packed two per row (segments 1, 2 and 3, 4), tokens | segments | mask."""
  rows = []
  for two in (EXAMPLES[:2], EXAMPLES[2:]):
    row = np.zeros((3, T + 1), np.int32)
    at = 0
    for k, ex in enumerate(two):
      for j, key in enumerate(("chosen_ids", "rejected_ids")):
        ids = ex["prompt_ids"] + ex[key]
        n = len(ids)
        row[0, at:at + n], row[1, at:at + n] = ids, 2 * k + 1 + j
        row[2, at + len(ex["prompt_ids"]):at + n] = 1
        at += n
    rows.append(row.reshape(-1))
  return jnp.asarray(np.stack(rows))


@pytest.fixture(scope="module")
def adapted(tmp_path_factory, transformers_lib):
  """(PeftModel, its adapter directory): LoRA r 4 on GPT-2's c_attn and c_fc, B random."""
  torch, transformers = transformers_lib
  peft = pytest.importorskip("peft")
  torch.manual_seed(0)
  base = transformers.AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.float32)
  model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, fan_in_fan_out=True,
                                                    target_modules=["c_attn", "c_fc"]))
  for name, p in model.named_parameters():
    if "lora_B" in name:
      torch.nn.init.normal_(p, std=0.3)
  path = tmp_path_factory.mktemp("dpo") / "adapter"
  model.save_pretrained(path)
  return model, path


def _trl_metrics(adapted, transformers_lib, loss_type, beta, label_smoothing, tmp_path,
                 examples=EXAMPLES):
  """(loss, metrics) of TRL's DPOTrainer.compute_loss on `examples` (token ids), in float32.

  TRL 1.16's DPOConfig defaults to bf16=True, and accelerate then wraps the reference model's
  forward in bfloat16 autocast, even on the CPU (training_step does the same to the policy's):
  the reference log-probabilities move by ~1e-3 relative. bf16=False is TRL in float32, which
  ours is. The reference is the base loaded alone (ours: the adapters off), run by TRL itself
  on its padded batch (with a PEFT model and no ref_model, TRL 1.16 would copy the adapter as
  it is into a "ref" adapter: the policy at the start, which for a new adapter is the base)."""
  torch, transformers = transformers_lib
  trl = pytest.importorskip("trl")
  datasets = pytest.importorskip("datasets")
  from model.hf.tokenizer import save_hf_gpt2_tokenizer  # pylint: disable=import-outside-toplevel
  from model.tokenizer import get_tokenizer  # pylint: disable=import-outside-toplevel
  save_hf_gpt2_tokenizer(get_tokenizer("gpt2"), tmp_path / "tok", model_max_length=32)
  tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "tok")
  tokenizer.pad_token = "!"  # id 0: inside the tiny model's 96 tokens
  model, _ = adapted
  args = trl.DPOConfig(output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True,
                       bf16=False, beta=beta, loss_type=[loss_type],
                       label_smoothing=label_smoothing, per_device_train_batch_size=4)
  text = datasets.Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}])
  reference = transformers.AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.float32)
  trainer = trl.DPOTrainer(model=model, ref_model=reference, args=args, train_dataset=text,
                           processing_class=tokenizer)
  assert not trainer.precompute_ref_logps and not trainer.args.bf16
  batch = trainer.data_collator(examples)
  trainer.model.train()
  with torch.no_grad():
    loss = float(trainer.compute_loss(trainer.model, batch))
  return loss, {k: v[-1] for k, v in trainer._metrics["train"].items()}  # pylint: disable=protected-access


def _ours(adapted, settings):
  w = load_weights(adapted[1])
  fn = jax.jit(lambda p, b: dpo_loss_and_metrics(p, w.cfg, b, settings))
  loss, metrics = fn(w.params, _preference_batch())
  return float(loss), {k: float(v) for k, v in metrics.items()}


def _assert_close(loss, metrics, expected_loss, expected):
  np.testing.assert_allclose(loss, expected_loss, rtol=1e-5, atol=1e-6)
  for name in TRL_METRICS:
    np.testing.assert_allclose(metrics[name], expected[name], rtol=1e-5, atol=1e-6,
                               err_msg=name)


@pytest.mark.parametrize("loss_type, beta, smoothing", [("sigmoid", 0.1, 0.0),
                                                        ("robust", 0.5, 0.2),
                                                        ("ipo", 0.3, 0.0)])
def test_loss_and_metrics_equal_trls(adapted, transformers_lib, tmp_path, loss_type, beta,
                                     smoothing):
  expected_loss, expected = _trl_metrics(adapted, transformers_lib, loss_type, beta, smoothing,
                                         tmp_path)
  loss, metrics = _ours(adapted, DPOSettings(beta, loss_type, smoothing))
  _assert_close(loss, metrics, expected_loss, expected)
  assert expected["rewards/margins"] != 0 and 0 < expected["rewards/accuracies"] < 1


def test_cdpo_is_trls_sigmoid_of_the_pairs_and_of_the_pairs_flipped(adapted, transformers_lib,
                                                                    tmp_path):
  """Conservative DPO (Mitchell 2023; TRL's loss_type="sigmoid" with label_smoothing e before
  TRL 1.0; TRL 1.16's sigmoid ignores label_smoothing and has no cDPO) is the sigmoid loss of
  the pairs weighted 1 - e plus that of the pairs with chosen and rejected swapped weighted e:
  both from TRL; the metrics are the sigmoid's."""
  e, beta = 0.2, 0.5
  flipped = [dict(ex, chosen_ids=ex["rejected_ids"], rejected_ids=ex["chosen_ids"])
             for ex in EXAMPLES]
  plain_loss, expected = _trl_metrics(adapted, transformers_lib, "sigmoid", beta, 0.0,
                                      tmp_path / "plain")
  flipped_loss, _ = _trl_metrics(adapted, transformers_lib, "sigmoid", beta, 0.0,
                                 tmp_path / "flipped", flipped)
  loss, metrics = _ours(adapted, DPOSettings(beta, "cdpo", e))
  _assert_close(loss, metrics, (1 - e) * plain_loss + e * flipped_loss, expected)
  assert abs(flipped_loss - plain_loss) > 1e-2  # the flipped pairs' term matters


def test_reference_with_lora_is_the_base_model_exactly(adapted):
  """The reference log-probabilities of the adapted model are bit for bit those of its base
  loaded alone, and differ from the policy's (the adapters are on for it)."""
  w = load_weights(adapted[1])
  base = load_weights(BASE)
  batch = _preference_batch()
  ref = jax.jit(lambda p: reference_logps(p, w.cfg, batch))(w.params)
  alone = jax.jit(lambda p: sequence_logps(p, base.cfg, batch)[0])(base.params)
  policy = jax.jit(lambda p: sequence_logps(p, w.cfg, batch)[0])(w.params)
  np.testing.assert_array_equal(np.asarray(ref), np.asarray(alone))
  chosen, rejected = pairs(np.asarray(policy))
  assert np.all(chosen[:, :2] != pairs(np.asarray(ref))[0][:, :2])
  assert lora.has_adapters(w.params) and not lora.has_adapters(base.params)


@pytest.mark.parametrize("line, expected", [
    ({"prompt": "a", "chosen": "b"}, "the line has no 'rejected'"),
    ({"prompt": "a", "rejected": "c"}, "the line has no 'chosen'"),
    ({"prompt": "a", "chosen": "", "rejected": "c"}, "\"chosen\" is empty"),
])
def test_bad_preference_lines_name_file_and_line(tmp_path, capsys, line, expected):
  data = tmp_path / "pairs.jsonl"
  good = json.dumps({"prompt": "Hi\n", "chosen": "yes\n", "rejected": "no\n"})
  data.write_text("\n".join([good, good, json.dumps(line), good]) + "\n")
  workdir = tmp_path / "run"
  status = exit_status(train_cli.main, [
      "--config", "configs/tiny.py", "--workdir", str(workdir), f"--config.init_from={BASE}",
      "--config.data.task=preference", "--config.data.source=jsonl",
      f"--config.data.path={data}", "--config.data.val_fraction=0.5", "--config.train.lora.rank=2",
      "--config.model.block_size=16"])
  err = capsys.readouterr().err.strip().splitlines()
  assert status == 2
  assert len(err) == 1 and err[0].startswith(f"error: {data}:3: ") and expected in err[0], err
  assert not workdir.exists()
