"""Makes shakespeare_preference.jsonl beside it: DPO pairs from tiny shakespeare (the package's
copy). Each pair's prompt is the end of a line of a speech (its last PROMPT characters),
"chosen" the line that follows it, "rejected" the same following line with its words shuffled
(a fixed seed): a preference a character model of Shakespeare learns in minutes. Following
lines of 3 or more words and at most LINE characters, so that a pair (the prompt twice and both
completions) fits the 64-character context of configs/shakespeare_char.py:cpu's model. The
set's characters are tiny shakespeare's 65 (pairs holding the rare ones are added), so a
character model trained on tiny shakespeare reads it with its own table.

    python training/data/assets/make_shakespeare_preference.py   # PAIRS pairs
"""

import json
import pathlib
import random

HERE = pathlib.Path(__file__).parent
PROMPT, LINE = 10, 20
PAIRS = 1500


def pairs(text: str, count: int, seed: int = 0) -> list[dict]:
  rng = random.Random(seed)
  lines = text.split("\n")
  candidates = []
  for a, b in zip(lines, lines[1:]):
    words = b.split()
    if (a and b and not a.endswith(":") and not b.endswith(":") and len(words) >= 3
        and len(b) <= LINE and len(set(words)) > 1):
      shuffled = words[:]
      while shuffled == words:
        rng.shuffle(shuffled)
      candidates.append({"prompt": a[-PROMPT:] + "\n", "chosen": b + "\n",
                         "rejected": " ".join(shuffled) + "\n"})
  rng.shuffle(candidates)
  chosen = candidates[:count]
  needed = set(text) - set("".join(t for p in chosen for t in p.values()))
  for p in candidates[count:]:  # the rare characters, so the table is tiny shakespeare's
    if needed & set(p["prompt"] + p["chosen"]):
      chosen.insert(rng.randrange(len(chosen)), p)
      needed -= set(p["prompt"] + p["chosen"])
  for c in sorted(needed):  # characters no line pair holds (the file's lone ones)
    chosen.append({"prompt": f"{c}\n", "chosen": f"{c}\n", "rejected": f" {c}\n"})
  return chosen


def main():
  text = (HERE / "tinyshakespeare.txt").read_text(encoding="utf-8")
  out = HERE / "shakespeare_preference.jsonl"
  rows = pairs(text, PAIRS)
  out.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
  print(f"wrote {out}: {len(rows)} pairs")


if __name__ == "__main__":
  main()
