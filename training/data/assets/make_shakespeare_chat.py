"""Makes shakespeare_chat.jsonl, the small chat set configs/chat_sft.py fine-tunes on, from
tiny shakespeare (the copy beside this script): deterministic, no network.

    python training/data/assets/make_shakespeare_chat.py   # rewrites shakespeare_chat.jsonl

The play's speeches in order ("NAME:" then its lines, a blank line between speeches) become
conversations of two kinds, chosen by a fixed random generator:
  who speaks next  user: a speech ("NAME:\\n<lines>") and "Who speaks next?";
                   assistant: the next speech's speaker (a short answer, exact-match checkable)
  continue         user: "Continue the speech of NAME:" and the speech's first line;
                   assistant: its second line; sometimes a second turn: "And then?" -> its
                   third line
A quarter of them start with a system message. Speeches or lines too long for a 256-character
model are skipped (at most MAX_CONTENT characters in all), so every conversation fits
configs/chat_sft.py:cpu's block size with the default template's headers.
"""

import json
import pathlib
import random

HERE = pathlib.Path(__file__).parent
SYSTEM = "You are a player in a play by Shakespeare."
MAX_SPEECH, MAX_LINE = 150, 70  # characters
MAX_CONTENT = 200  # characters of all messages: with the headers, under 256
COUNT = 1600  # conversations


def speeches(text: str) -> list[tuple[str, list[str]]]:
  out = []
  for block in text.split("\n\n"):
    lines = block.strip("\n").split("\n")
    if len(lines) >= 2 and lines[0].endswith(":") and lines[0][:-1].strip():
      out.append((lines[0][:-1], lines[1:]))
  return out


def conversations(plays: list[tuple[str, list[str]]], rng: random.Random) -> list[dict]:
  out = []
  for i in range(len(plays) - 1):
    name, lines = plays[i]
    messages = [{"role": "system", "content": SYSTEM}] if rng.random() < 0.25 else []
    speech = "\n".join(lines)
    if rng.random() < 0.6:
      if len(speech) > MAX_SPEECH:
        continue
      messages += [{"role": "user", "content": f"{name}:\n{speech}\n\nWho speaks next?"},
                   {"role": "assistant", "content": plays[i + 1][0]}]
    else:
      if len(lines) < 2 or max(len(line) for line in lines[:3]) > MAX_LINE:
        continue
      messages += [{"role": "user", "content": f"Continue the speech of {name}:\n{lines[0]}"},
                   {"role": "assistant", "content": lines[1]}]
      if len(lines) >= 3 and rng.random() < 0.5:
        messages += [{"role": "user", "content": "And then?"},
                     {"role": "assistant", "content": lines[2]}]
    if sum(len(m["content"]) for m in messages) <= MAX_CONTENT:
      out.append({"messages": messages})
  rng.shuffle(out)
  return out[:COUNT]


def main() -> None:
  plays = speeches((HERE / "tinyshakespeare.txt").read_text(encoding="utf-8"))
  chats = conversations(plays, random.Random(0))
  path = HERE / "shakespeare_chat.jsonl"
  path.write_text("".join(json.dumps(c) + "\n" for c in chats), encoding="utf-8")
  print(f"{path}: {len(chats)} conversations, {path.stat().st_size:,} bytes")


if __name__ == "__main__":
  main()
