"""Cloud TPU: the slice table (slices.py, also what launch.aot compiles for) and the gcloud
commands that create a slice, set it up and train on it (gcloud.py, behind launch.tpu)."""
