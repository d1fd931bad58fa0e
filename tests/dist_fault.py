"""``writesae`` under torchrun with one rank killed (tests/test_distributed.py): the rank named by
``WRITESAE_KILL_RANK`` exits hard (no clean-up) right after writing its first shard of an extraction."""

import os
import sys

from writesae_plugin import store

if int(os.environ["RANK"]) == int(os.environ["WRITESAE_KILL_RANK"]):
    _write = store.atomic_write_bytes

    def _write_then_die(path, data):
        _write(path, data)
        os._exit(3)

    store.atomic_write_bytes = _write_then_die

from writesae_plugin.cli import main  # noqa: E402

sys.exit(main(sys.argv[1:]))
