"""Training: from a config to a run (run.py: build_run), and the loop and what it needs.

  run.py         config -> validated Run (model config, mesh, rules, optimizer, abstract state,
                 compiled steps); what launch.train, launch.benchmark and launch.aot all build
  loop.py        train(config, workdir): resume, step, evaluate, checkpoint, stop cleanly
  step.py        the pure train / eval steps, jitted with shardings
  state.py       TrainState, born sharded
  optimizer.py   AdamW with nanoGPT's schedule and decay mask
  checkpoint.py  orbax checkpoints of a workdir; loading a run for inference
  metrics.py     metrics.jsonl, TensorBoard, the console line
  distributed.py multi-process (multi-host) start-up and preemption sync
  data/          the data pipeline (sources, text, tfds, the token-file format)
  tpu/           the TPU slice table and the gcloud commands
  perf/          FLOPs and MFU, the benchmark, the ahead-of-time TPU compile
"""
