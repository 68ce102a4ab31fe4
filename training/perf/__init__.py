"""Speed and size, measured honestly: FLOPs per token and MFU (flops.py), the benchmark behind
launch.benchmark (benchmark.py), and the ahead-of-time TPU compile behind launch.aot (aot.py)."""
