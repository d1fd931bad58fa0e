"""``writesae`` under torchrun with one rank killed (tests/test_distributed.py): the rank named by
``WRITESAE_KILL_RANK`` exits hard (no clean-up): right after writing its first shard of an extraction, or, with
``WRITESAE_KILL_AT_SAMPLES=N``, at the first training step after N samples."""

import os
import sys

from writesae_plugin import store, train

if int(os.environ["RANK"]) == int(os.environ["WRITESAE_KILL_RANK"]):
    at = os.environ.get("WRITESAE_KILL_AT_SAMPLES")
    if at is None:
        _write = store.atomic_write_bytes

        def _write_then_die(path, data):
            _write(path, data)
            os._exit(3)

        store.atomic_write_bytes = _write_then_die
    else:
        _step = train.WriteSAETrainer.step

        def _step_or_die(self, batch):
            if self.n_training_samples >= int(at):
                os._exit(3)
            return _step(self, batch)

        train.WriteSAETrainer.step = _step_or_die

from writesae_plugin.cli import main  # noqa: E402

sys.exit(main(sys.argv[1:]))
