"""training/data/packing.py and the tasks of examples (chat.py, prefix_lm.py, examples.py):
best-fit packing, batches a pure function of (seed, split, index) on any number of processes,
every example once per epoch, the packed layout, the loss mask on the assistant's tokens, and
bad input as one sentence naming the file and line."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import exit_status
from launch import train as train_cli
from model.config import ModelConfig
from model.errors import UserError
from model.gpt import GPT
from model.tokenizer import get_tokenizer
from training import data
from training.data.chat_template import DEFAULT_CHAR_END_OF_TURN
from training.data.packing import Examples, PackedSource, best_fit_decreasing, pack_all
from training.step import loss_and_metrics


def examples_of(lengths, seed=0):
  rng = np.random.default_rng(seed)
  return Examples.of([(rng.integers(1, 50, n).astype(np.int32),
                       (rng.random(n) < 0.5).astype(np.int32)) for n in lengths])


def source(ex, batch=4, T=15, packing="best_fit", **kw):
  return PackedSource({"train": ex, "val": ex}, name="t", vocab_size=50, tokenizer=None,
                      what="test", packing=packing, seq_len=T, global_batch_size=batch, seed=3,
                      **{"process_index": 0, "process_count": 1, **kw})


def planes(batch, T):
  return batch.reshape(len(batch), 3, T + 1)


def test_best_fit_decreasing_places_every_example_once_within_capacity():
  lengths = np.random.default_rng(0).integers(1, 17, 500)
  rows = best_fit_decreasing(lengths, 16)
  assert sorted(i for row in rows for i in row) == list(range(500))
  assert all(sum(lengths[i] for i in row) <= 16 for row in rows)
  # within 10% of the lower bound ceil(total / capacity) on these sizes
  assert len(rows) <= 1.1 * np.ceil(lengths.sum() / 16)
  assert best_fit_decreasing(lengths, 16) == rows
  assert best_fit_decreasing([16, 1, 15, 8, 8], 16) == [[0], [2, 1], [3, 4]]


def test_packed_rows_hold_the_examples_with_their_segments_and_loss():
  ex = examples_of(np.random.default_rng(1).integers(1, 17, 60))
  src = source(ex)
  R = src.rows_per_epoch["train"]
  seen = []
  for i in range(-(-R // 4)):
    for row in planes(src.get_batch("train", i), 15)[:max(0, min(4, R - 4 * i))]:
      tokens, seg, loss = row
      k = int(seg.max())
      assert (seg[seg > 0] == np.repeat(np.arange(1, k + 1), np.bincount(seg)[1:])).all()
      assert (seg[np.flatnonzero(seg == 0)] == 0).all() and (loss[seg == 0] == 0).all()
      assert np.all(np.diff(np.flatnonzero(seg == 0)) == 1) and (seg[-1] == 0 or seg.all())
      for s in range(1, k + 1):
        seen.append((tuple(tokens[seg == s]), tuple(loss[seg == s])))
  expected = sorted((tuple(ex.get(k)[0]), tuple(ex.get(k)[1])) for k in range(len(ex)))
  assert sorted(seen) == expected  # epoch 0: every example exactly once


def test_batches_are_a_function_of_seed_split_index_on_any_process_count():
  ex = examples_of(np.random.default_rng(2).integers(1, 17, 40))
  one = source(ex)
  again = source(ex)
  for i in (0, 1, 7, 30):  # 30: past the first epoch
    assert np.array_equal(one.get_batch("train", i), again.get_batch("train", i))
    halves = [source(ex, process_index=p, process_count=2).get_batch("train", i)
              for p in range(2)]
    assert np.array_equal(np.concatenate(halves), one.get_batch("train", i))
  assert not np.array_equal(one.get_batch("train", 0), one.get_batch("train", 1))
  assert not np.array_equal(one.get_batch("train", 0), one.get_batch("val", 0))


def test_packing_none_is_one_example_per_row_and_packing_saves_padding():
  ex = examples_of([2] * 30 + [15] * 4)
  packed, alone = source(ex), source(ex, packing="none")
  assert alone.rows_per_epoch["train"] == 34
  assert (planes(alone.get_batch("train", 0), 15)[:, 1].max(axis=1) == 1).all()
  assert packed.rows_per_epoch["train"] == 4 + 4  # a row of 15 each, then 8 + 8 + 8 + 6 twos
  assert packed.padding_share() < alone.padding_share() / 3
  rows = pack_all(ex, 16)
  assert sorted(rows.reshape(-1, 3, 16)[:, 1].max(axis=1)) == [1] * 4 + [6] + [8] * 3


def chat_cfg(tmp_path, lines, **kw):
  cfg = data.default_data_config()
  path = tmp_path / "chats.jsonl"
  path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n"
                          for line in lines))
  cfg.update({"task": "chat", "source": "jsonl", "path": str(path), "chat_template": "default",
              "val_fraction": 0.5, **kw})
  return cfg, str(path)


def make(cfg, task="chat", T=127):
  return data.make_task_source(cfg, task, seq_len=T, global_batch_size=2, seed=0,
                               process_index=0, process_count=1)


CHAT = {"messages": [{"role": "system", "content": "Be brief."},
                     {"role": "user", "content": "Who speaks next?"},
                     {"role": "assistant", "content": "ROMEO"},
                     {"role": "user", "content": "And then?"},
                     {"role": "assistant", "content": "JULIET"}]}


def test_chat_loss_mask_is_the_assistant_tokens(tmp_path):
  cfg, _ = chat_cfg(tmp_path, [CHAT, {"prompt": "Hi", "completion": "Ho"}], tokenizer="gpt2")
  src = make(cfg)
  gpt2 = get_tokenizer("gpt2")
  assert src.end_of_turn == gpt2.eot_id
  tokens, loss = src.examples["train"].get(0)
  assert gpt2.decode(tokens[loss == 1]) == "ROMEO<|endoftext|>JULIET<|endoftext|>"
  tokens, loss = src.examples["val"].get(0)
  assert gpt2.decode(tokens) == "User:\nHi<|endoftext|>\nAssistant:\nHo<|endoftext|>\n"
  assert gpt2.decode(tokens[loss == 1]) == "Ho<|endoftext|>"
  chars = make(chat_cfg(tmp_path, [CHAT, CHAT], tokenizer="char")[0])
  table = get_tokenizer("char", text=chars.tokenizer["chars"])
  tokens, loss = chars.examples["train"].get(0)
  assert table.decode(tokens[loss == 1]) == f"ROMEO{DEFAULT_CHAR_END_OF_TURN}JULIET" \
                                            f"{DEFAULT_CHAR_END_OF_TURN}"


def test_the_chat_loss_is_on_the_assistant_tokens_only(tmp_path):
  """Through the real step's loss: changing a token of a system or user turn after the last
  assistant turn changes nothing; changing an assistant token changes the loss."""
  messages = CHAT["messages"][:3] + [{"role": "user", "content": "Thanks, all."},
                                     {"role": "system", "content": "Done."}]
  cfg, _ = chat_cfg(tmp_path, [{"messages": messages}] * 2, tokenizer="char")
  src = make(cfg, T=127)
  batch = src.get_batch("train", 0)
  table = get_tokenizer("char", text=src.tokenizer["chars"])
  model = ModelConfig(vocab_size=src.vocab_size, block_size=127, num_layers=1, num_heads=2,
                      d_model=16)
  params = GPT(model).init(jax.random.key(0), jnp.zeros((1, 127), jnp.int32))["params"]
  loss = lambda b: float(loss_and_metrics(params, model, jnp.asarray(b), None, False,
                                          layout="packed")[0])
  base = loss(batch)
  text = table.decode(batch[0, :128])
  for what, where, changes in (("user", text.index("Thanks") + 2, False),
                               ("system", text.index("Done") + 1, False),
                               ("assistant", text.index("ROMEO") + 2, True)):
    changed = batch.copy()
    changed[0, where] = (changed[0, where] + 1) % src.vocab_size
    assert (loss(changed) != base) == changes, what


def test_prefix_lm_windows_and_pairs(tmp_path):
  cfg = data.default_data_config()
  cfg.task = "prefix_lm"
  rows = planes(make(cfg, "prefix_lm", T=16).get_batch("train", 0), 16)
  assert (rows[:, 1] == 1).all() and (rows[:, 2, :8] == 0).all() and (rows[:, 2, 8:] == 1).all()
  cfg.prefix_fraction = 0.0
  rows = planes(make(cfg, "prefix_lm", T=16).get_batch("train", 3), 16)
  starts = (rows[:, 2] == 0).sum(axis=1)
  assert ((1 <= starts) & (starts <= 16)).all()
  pairs, _ = chat_cfg(tmp_path, [{"prompt": "ab", "completion": "cd"}] * 4, task="prefix_lm",
                      tokenizer="gpt2")
  src = make(pairs, "prefix_lm")
  tokens, loss = src.examples["train"].get(0)
  assert get_tokenizer("gpt2").decode(tokens[loss == 1]) == "cd<|endoftext|>"


@pytest.mark.parametrize("line,message", [
    ("{not json", r"chats.jsonl:2: not a JSON object \(Expecting property name"),
    ({"text": "x"}, r"chats.jsonl:2: the line has no \"messages\" \(nor \"prompt\" and "
                    r"\"completion\"\); it has 'text'\.$"),
    ({"messages": [{"role": "narrator", "content": "x"}]},
     r"chats.jsonl:2: message 0 has the unknown role 'narrator'; use system, user, assistant\.$"),
    ({"messages": [{"role": "user", "content": ["x"]}]},
     r"chats.jsonl:2: message 0's content is a list, not a string\.$"),
    ({"messages": [{"role": "user", "content": "x"}]},
     r"chats.jsonl:2: the conversation has no assistant message"),
    ({"messages": [{"role": "user", "content": "x" * 200},
                   {"role": "assistant", "content": "y"}]},
     r"chats.jsonl:2: the conversation is 2\d\d tokens, longer than a row of block_size \+ 1 = "
     r"128; set data.overlong=drop or truncate"),
])
def test_bad_chat_lines_are_one_sentence_naming_the_line(tmp_path, line, message):
  cfg, _ = chat_cfg(tmp_path, [CHAT, line, CHAT, CHAT])
  with pytest.raises(UserError, match=message):
    make(cfg)


def test_overlong_drop_and_truncate_are_counted(tmp_path):
  long = {"messages": [{"role": "user", "content": "x" * 60},
                       {"role": "assistant", "content": "y" * 120}]}
  for policy, left in (("drop", 2), ("truncate", 3)):
    cfg, _ = chat_cfg(tmp_path, [CHAT, long, CHAT, CHAT], overlong=policy, val_fraction=0.25)
    src = make(cfg)
    assert len(src.examples["train"]) == left and (src.examples["train"].lengths <= 128).all()
    word = "dropped" if policy == "drop" else "truncated"
    assert f"1 train conversations longer than 128 tokens {word}" in src.describe()


def test_chat_needs_a_template_and_jsonl(tmp_path):
  cfg, _ = chat_cfg(tmp_path, [CHAT] * 4, tokenizer="gpt2", chat_template="")
  with pytest.raises(UserError, match=r"^The tokenizer gpt2 has no chat template of its own; "
                     r"set data.chat_template='default'"):
    make(cfg)
  cfg, _ = chat_cfg(tmp_path, [CHAT] * 4, source="text")
  with pytest.raises(UserError, match="data.task='chat' reads conversations from a JSONL file"):
    make(cfg)
  raising = "{{ raise_exception('Only user and assistant roles are supported!') }}"
  cfg, path = chat_cfg(tmp_path, [CHAT] * 4, chat_template=raising)
  with pytest.raises(UserError, match=rf"^{path}:1: data.chat_template raised an error: Only "
                     r"user and assistant roles are supported!$"):
    make(cfg)


def test_launch_train_refuses_a_bad_chat_file_with_exit_2_and_writes_nothing(tmp_path, capsys):
  path = tmp_path / "chats.jsonl"
  path.write_text(json.dumps(CHAT) + "\n" + '{"messages": [{"role": "bot", "content": "x"}]}\n'
                  + (json.dumps(CHAT) + "\n") * 10)
  workdir = tmp_path / "run"
  status = exit_status(train_cli.main, ["--config", "configs/chat_sft.py:cpu",
                                        f"--workdir={workdir}", f"--config.data.path={path}"])
  err = capsys.readouterr().err
  assert status == 2 and err.strip() == (f"error: {path}:2: message 0 has the unknown role 'bot'; "
                                         f"use system, user, assistant.")
  assert not workdir.exists()
