"""training/data/chat_template.py: chat templates render and mark the assistant's tokens as
transformers' apply_chat_template(..., return_assistant_tokens_mask=True) does, on published
templates (tests/fixtures/chat_templates/, their sources in its README), with and without
generation blocks, system prompts and several turns; the prefix rule where a template has no
generation blocks; the default template; template errors as one sentence."""

import json

import numpy as np
import pytest

from conftest import REPO
from model.errors import UserError
from model.hf.tokenizer import load_hf_tokenizer, save_hf_gpt2_tokenizer
from model.tokenizer import get_tokenizer
from training.data.chat_template import (DEFAULT_CHAR_END_OF_TURN, ChatTemplate,
                                         resolve_template, token_mask)

TEMPLATES = REPO / "tests" / "fixtures" / "chat_templates"
# template file -> (bos, eos, the special tokens it writes)
SPECIALS = {
    "llama3.jinja": ("<|begin_of_text|>", "<|eot_id|>",
                     ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                      "<|eot_id|>"]),
    "qwen2_5.jinja": (None, "<|im_end|>", ["<|im_start|>", "<|im_end|>"]),
    "qwen2_5_training.jinja": (None, "<|im_end|>", ["<|im_start|>", "<|im_end|>"]),
    "lfm2_2_5.jinja": ("<|startoftext|>", "<|im_end|>",
                       ["<|startoftext|>", "<|im_start|>", "<|im_end|>"]),
}
CHATS = {
    "one turn": [{"role": "user", "content": "Who speaks next?"},
                 {"role": "assistant", "content": "ROMEO"}],
    "system, two turns": [
        {"role": "system", "content": "You are a player in a play."},
        {"role": "user", "content": "Continue the speech of JULIET:\nO Romeo, Romeo!"},
        {"role": "assistant", "content": "wherefore art thou Romeo?"},
        {"role": "user", "content": "And then?"},
        {"role": "assistant", "content": " Deny thy father and refuse thy name; "}],
    "three turns, unicode": [
        {"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "In French?"}, {"role": "assistant", "content": "Bonjour, ça va ?"},
        {"role": "user", "content": "Thanks."}, {"role": "assistant", "content": "😀 De rien"}],
}


@pytest.fixture(scope="module")
def gpt2_files(tmp_path_factory):
  """GPT-2's BPE as Hugging Face tokenizer files (made offline from the packaged ranks)."""
  out = tmp_path_factory.mktemp("gpt2_tokenizer")
  save_hf_gpt2_tokenizer(get_tokenizer("gpt2"), out)
  return out


def template_dir(name, gpt2_files, transformers, tmp_path_factory):
  """A tokenizer directory: GPT-2 BPE plus the template's special tokens, its chat template
  in the files, written by transformers (so both sides read the same tokenizer.json)."""
  bos, eos, specials = SPECIALS[name]
  tok = transformers.AutoTokenizer.from_pretrained(str(gpt2_files))
  tok.add_special_tokens({"additional_special_tokens": specials})
  tok.bos_token, tok.eos_token = bos, eos
  tok.chat_template = (TEMPLATES / name).read_text()
  out = tmp_path_factory.mktemp(name.replace(".", "_"))
  tok.save_pretrained(str(out))
  return out, transformers.AutoTokenizer.from_pretrained(str(out))


@pytest.mark.parametrize("name", sorted(SPECIALS))
def test_ids_and_assistant_mask_equal_transformers(name, gpt2_files, transformers_lib,
                                                   tmp_path_factory):
  _, transformers = transformers_lib
  directory, theirs = template_dir(name, gpt2_files, transformers, tmp_path_factory)
  ours = load_hf_tokenizer(directory)
  template = resolve_template("", ours)
  assert template.has_generation == (name in ("qwen2_5_training.jinja", "lfm2_2_5.jinja"))
  for label, messages in CHATS.items():
    ids, mask = template.encode(ours, messages, where=label)
    if template.has_generation:
      ref = theirs.apply_chat_template(messages, tokenize=True, return_dict=True,
                                       return_assistant_tokens_mask=True)
      ref_ids, ref_mask = ref["input_ids"], ref["assistant_masks"]
    else:  # the prefix rule, by transformers' rendering, tokens and offsets: the tokens
      # overlapping the characters each assistant turn adds to the conversation before it
      text = theirs.apply_chat_template(messages, tokenize=False)
      enc = theirs(text, add_special_tokens=False, return_offsets_mapping=True)
      ref_ids, ref_mask = enc["input_ids"], np.zeros(len(enc["input_ids"]), np.int32)
      for i, m in enumerate(messages):
        if m["role"] == "assistant":
          before = theirs.apply_chat_template(messages[:i], tokenize=False,
                                              add_generation_prompt=True)
          upto = theirs.apply_chat_template(messages[:i + 1], tokenize=False)
          assert text.startswith(upto) and upto.startswith(before)
          for t, (a, b) in enumerate(enc["offset_mapping"]):
            ref_mask[t] |= int(b > len(before) and a < len(upto))
    assert ids.tolist() == list(ref_ids), (name, label)
    assert mask.tolist() == list(ref_mask), (name, label)
    assert mask.sum() > 0 and mask.sum() < len(mask)
    prompt = template.generation_prompt(ours, messages[:-1])
    assert prompt == list(theirs.apply_chat_template(messages[:-1], tokenize=True,
                                                     return_dict=True,
                                                     add_generation_prompt=True)["input_ids"])
  eot = template.end_of_turn(ours)
  assert ours.decode([eot]) == "" and theirs.convert_ids_to_tokens(eot) == SPECIALS[name][1]


def test_the_prefix_rule_agrees_with_generation_blocks(gpt2_files, transformers_lib,
                                                       tmp_path_factory):
  """Qwen2.5's template without and with generation blocks: the same tokens, and the same
  assistant tokens but one: TRL's variant opens its block before the newline that ends
  '<|im_start|>assistant', which the generation prompt holds (so the prefix rule leaves it to
  the prompt)."""
  _, transformers = transformers_lib
  plain_dir, _ = template_dir("qwen2_5.jinja", gpt2_files, transformers, tmp_path_factory)
  tok = load_hf_tokenizer(plain_dir)
  plain = resolve_template("", tok)
  tagged = ChatTemplate((TEMPLATES / "qwen2_5_training.jinja").read_text(),
                        special_tokens=plain.special_tokens)
  for messages in CHATS.values():
    (ids, by_prefix), (tagged_ids, by_blocks) = plain.encode(tok, messages), tagged.encode(tok, messages)
    assert ids.tolist() == tagged_ids.tolist()
    extra = np.flatnonzero(by_blocks != by_prefix)
    assert (by_blocks >= by_prefix).all()
    assert len(extra) == sum(m["role"] == "assistant" for m in messages)
    assert all(tok.decode([ids[t]]) == "\n" and by_prefix[t + 1] == 1 for t in extra)


def test_default_template_for_gpt2_and_characters():
  messages = CHATS["system, two turns"]
  gpt2 = get_tokenizer("gpt2")
  template = resolve_template("default", gpt2)
  ids, mask = template.encode(gpt2, messages)
  assert template.end_of_turn(gpt2) == gpt2.eot_id
  text = gpt2.decode(ids)
  assert text.startswith("System:\nYou are a player in a play.<|endoftext|>\nUser:\n")
  scored = gpt2.decode(ids[mask == 1])
  assert scored == ("wherefore art thou Romeo?<|endoftext|> Deny thy father and refuse thy "
                    "name; <|endoftext|>")
  prompt = gpt2.decode(template.generation_prompt(gpt2, messages[:2]))
  assert prompt.endswith("O Romeo, Romeo!<|endoftext|>\nAssistant:\n")
  chars = template_text = resolve_template("default", get_tokenizer("char", text="x"))
  rendered, spans = chars.assistant_spans(messages)
  table = get_tokenizer("char", text=rendered)
  assert chars.end_of_turn(table) == table.encode(DEFAULT_CHAR_END_OF_TURN)[0]
  assert [rendered[a:b] for a, b in spans] == [
      "wherefore art thou Romeo?" + DEFAULT_CHAR_END_OF_TURN,
      " Deny thy father and refuse thy name; " + DEFAULT_CHAR_END_OF_TURN]
  del template_text


def test_template_errors_are_one_sentence(tmp_path):
  gpt2 = get_tokenizer("gpt2")
  raising = ChatTemplate("{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversations "
                         "must start with the user') }}{% endif %}{{ messages[0]['content'] }}",
                         source="the chat template t.jinja")
  with pytest.raises(UserError, match=r"^chats.jsonl:7: the chat template t.jinja raised an "
                     r"error: Conversations must start with the user$"):
    raising.render([{"role": "assistant", "content": "x"}], where="chats.jsonl:7")
  with pytest.raises(UserError, match="is not a valid Jinja template"):
    ChatTemplate("{% for m in messages %}", source="x")
  with pytest.raises(UserError, match="has no chat template of its own; set "
                     "data.chat_template='default'"):
    resolve_template("", gpt2)
  with pytest.raises(UserError, match="neither 'default', '', a template nor an existing file"):
    resolve_template(str(tmp_path / "missing.jinja"), gpt2)
  # the sandbox: no attribute escapes
  sneaky = ChatTemplate("{{ messages.__class__.__mro__ }}")
  with pytest.raises(UserError):
    sneaky.render([{"role": "user", "content": "x"}])
  out, _ = ChatTemplate("{{ messages | tojson }} {{ strftime_now('%Y') | length }}").render(
      [{"role": "user", "content": "<b>é</b>"}])
  assert out == json.dumps([{"role": "user", "content": "<b>é</b>"}], ensure_ascii=False) + " 4"


def test_token_mask_marks_tokens_overlapping_a_span():
  offsets = [(0, 2), (2, 5), (5, 6), (6, 9), (9, 10)]
  assert token_mask(offsets, [(3, 6)]).tolist() == [0, 1, 1, 0, 0]
  assert token_mask(offsets, [(0, 1), (9, 10)]).tolist() == [1, 0, 0, 0, 1]
  assert token_mask(offsets, []).tolist() == [0] * 5
