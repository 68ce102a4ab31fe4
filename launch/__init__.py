"""The command-line entry points, and the only command-line code: python -m launch.<train |
sample | benchmark | prepare | tpu | aot>. Each parses absl flags and fails the same way
(launch/cli.py); everything they call lives in model/, sharding/ and training/."""
