"""Generation from the models of model/: `sampling.py` (GPT: the jitted prefill and KV-cache
decode loop, the sliding context window), `seq2seq.py` (the encoder-decoder: greedy, sampling and
beam search), `fill_mask.py` (the encoder), `logits.py` (temperature, top-k, top-p)."""
