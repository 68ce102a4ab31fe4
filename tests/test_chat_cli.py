"""launch.train on chats, launch.eval --data chat:FILE and launch.sample --chat, end to end on
a small chat run: the eval's assistant-token loss equals the model's loss on each conversation
run alone (unpacked), a --chat reply is the greedy decode of the template's generation prompt
stopped at its end-of-turn token, and bad chat input is one `error:` line, exit 2."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import built_once, exit_status
from launch import eval as eval_cli
from launch import sample as sample_cli
from launch import train as train_cli
from model.decode.sampling import generate
from model.gpt import GPT
from model.tokenizer import tokenizer_from_dict
from training.data.chat import SHIPPED_CHATS
from training.data.chat_template import ChatTemplate
from training.step import token_cross_entropy
from training.weights import WORKDIR, load_weights

CHATS = [json.loads(line) for line in SHIPPED_CHATS.read_text().splitlines()[-6:]]


def _train(path):
  status = exit_status(train_cli.main, [
      "--config", "configs/chat_sft.py:cpu", f"--workdir={path}", "--config.train.steps=3",
      "--config.model.num_layers=1", "--config.model.d_model=32", "--config.model.num_heads=2",
      "--config.model.block_size=128", "--config.data.overlong=drop",
      "--config.train.batch_size=8", "--config.eval.every=0"])
  assert status == 0


@pytest.fixture(scope="module")
def chat_run():
  workdir = built_once("chat_run", _train)
  w = load_weights(str(workdir), kind=WORKDIR)
  config = json.loads((workdir / "config.json").read_text())
  template = ChatTemplate(config["data"]["chat_template"])
  return workdir, w, tokenizer_from_dict(w.tokenizer), template


@pytest.fixture
def chats_file(tmp_path):
  path = tmp_path / "held_out.jsonl"
  path.write_text("".join(json.dumps(c) + "\n" for c in CHATS))
  return path


def test_eval_chat_loss_equals_each_conversation_alone(chat_run, chats_file, capsys):
  workdir, w, tok, template = chat_run
  assert exit_status(eval_cli.main, [f"--workdir={workdir}", f"--data=chat:{chats_file}",
                                     "--json", "--quiet"]) == 0
  result = json.loads(capsys.readouterr().out)
  nats = count = 0.0
  for chat in CHATS:
    ids, mask = template.encode(tok, chat["messages"])
    if len(ids) > w.cfg.block_size + 1:
      continue
    logits = GPT(w.cfg).apply({"params": w.params}, jnp.asarray(ids[None, :-1]))
    nll = np.asarray(token_cross_entropy(logits, jnp.asarray(ids[None, 1:])))[0]
    nats, count = nats + float((nll * mask[1:]).sum()), count + float(mask[1:].sum())
  assert result["tokens"] == count and result["conversations"] + result["left_out"] == 6
  np.testing.assert_allclose(result["loss"], nats / count, rtol=1e-5)


def test_sample_chat_is_the_greedy_decode_of_the_generation_prompt(chat_run, tmp_path, capsys):
  workdir, w, tok, template = chat_run
  messages = [{"role": "user", "content": "ROMEO:\nBut soft!\n\nWho speaks next?"}]
  path = tmp_path / "ask.jsonl"
  path.write_text(json.dumps({"messages": messages}) + "\n" + json.dumps({"prompt": "Hi"}) + "\n")
  for chat in (json.dumps(messages), str(path)):
    assert exit_status(sample_cli.main, [f"--workdir={workdir}", f"--chat={chat}",
                                         "--temperature=0", "--max_new_tokens=12", "--json",
                                         "--quiet"]) == 0
    record = json.loads(capsys.readouterr().out.splitlines()[0])
    assert record["prompt"] == template.render(messages, add_generation_prompt=True)[0]
    eot = template.end_of_turn(tok)
    ids = template.generation_prompt(tok, messages)
    ref = generate(w.params, w.cfg, [ids], max_new_tokens=12, temperature=0.0, eot_id=eot)
    assert record["token_ids"] == [int(t) for t in ref.tokens[0]]


@pytest.mark.parametrize("chat,message", [
    ("[{\"role\": \"user\"", "--chat is not valid JSON"),
    ('[{"role": "wizard", "content": "x"}]', "--chat: message 0 has the unknown role 'wizard'"),
    ("missing.jsonl", "--chat 'missing.jsonl' is neither a JSON list of messages nor an "
                      "existing JSONL file."),
])
def test_bad_chat_flags_are_one_error_line(chat_run, chat, message, capsys):
  workdir = chat_run[0]
  assert exit_status(sample_cli.main, [f"--workdir={workdir}", f"--chat={chat}"]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith(f"error: {message}") and "\n" not in err
