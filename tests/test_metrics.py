"""training/metrics.py: metrics.jsonl holds each step once after a resume."""

from training.metrics import MetricsWriter, read_metrics


def test_metrics_writer_drops_rows_after_resume_and_torn_lines(tmp_path):
  (tmp_path / "metrics.jsonl").write_text(
      '{"step": 1, "loss": 3.0}\n{"step": 2, "loss": 2.0}\n{"step": 3, "loss": 1.0}\n{"st')
  writer = MetricsWriter(tmp_path, start_step=2, tensorboard=False)
  writer.write({"step": 3, "loss": 1.5})
  writer.close()
  assert read_metrics(tmp_path) == [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0},
                                    {"step": 3, "loss": 1.5}]
