"""Training: optimizer, TrainState, steps, data, checkpoints, metrics, loop."""
