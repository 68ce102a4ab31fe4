"""training/checkpoint.py: what a killed save leaves behind is never loaded."""

import jax
import numpy as np

from training.checkpoint import Checkpointer
from training.step import abstract_like


def test_half_written_checkpoint_is_ignored(tmp_path, single_device_run):
  state = jax.device_put(single_device_run[1], jax.devices()[0])
  ckpt = Checkpointer(tmp_path, keep=2)
  ckpt.save(3, state, {"step": 3})
  ckpt.wait()
  ckpt.close()
  # What a process killed while saving step 7 leaves behind: orbax's temporary directory.
  junk = tmp_path / "checkpoints" / "7.orbax-checkpoint-tmp-1234"
  (junk / "state").mkdir(parents=True)
  (junk / "state" / "garbage").write_text("half")
  ckpt = Checkpointer(tmp_path, read_only=True)
  assert ckpt.latest_step() == 3 and ckpt.all_steps() == [3]
  restored, meta = ckpt.restore(abstract_like(state))
  assert meta == {"step": 3}
  np.testing.assert_array_equal(restored.params["wte"]["embedding"],
                                state.params["wte"]["embedding"])
