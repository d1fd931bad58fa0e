"""Running under ``torchrun``: the process group, ranks and barriers (PyTorch's own runtime, no scheduler of ours).

``torchrun --nproc-per-node N -m writesae_plugin.cli extract|train ...`` starts N processes with ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous address in their environment; :func:`init` joins the group
(NCCL when the device is a GPU, gloo on CPU) and returns this process's place in it. Without those variables it is
a single process (rank 0 of 1) and nothing is initialised.

What runs distributed (issue 14):

* ``extract``: shard ``i`` is extracted by rank ``i mod N``; every rank walks the same deterministic context
  stream (tokenising is cheap; the model runs only on its own shards) and records its shards in
  ``rank-{r}.json``; after a barrier rank 0 merges them into the manifest. The store is the one a single process
  writes, shard for shard, and it resumes with the same or another N.
* ``train --parallel cells``: the cells are dealt out over the ranks (cell ``j`` to rank ``j mod N``, printed at the
  start); each rank trains its cells from the store; rank 0 writes the release index after all finish.
* ``train --parallel data``: every rank holds every cell (stacked) and trains on its share of each global batch;
  gradients and dead-atom counters are all-reduced, BatchTopK's selection and threshold taken over all ranks,
  resampling done on the whole batch by every rank alike (``sae/stacked.py``); rank 0 writes checkpoints
  (atomically) and results, and a run resumes with any number of ranks. The SAEs equal one process's.

Devices: ``--device auto`` (or ``cuda``) puts each rank's model forward and SAE training (parameters, Adam's
state, batches, dead-atom counters, BatchTopK thresholds) on ``cuda:LOCAL_RANK`` when CUDA is available (NCCL then
joins the group and carries the collectives) and on the CPU otherwise (gloo). What is saved is device-independent
(``train.py``). Checked on the CPU only (``tests/test_device.py``); ``scripts/gpu_check_distributed.py`` is the
prepared GPU check.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class Place:
    """This process in the job: ``rank`` of ``world_size`` (``local_rank`` on its node)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


class RankProgress:
    """``--parallel cells``: the cell-samples every rank has trained, for rank 0's progress bar. Each rank writes
    its count to ``progress.rank{r}.json`` in the shared output directory (where the ranks' release indexes go),
    at most every ``every`` seconds; rank 0 reads and sums them. No collective, so a rank never waits for another;
    rank 0 removes the files when it merges the indexes."""

    def __init__(self, directory, place: Place, total: int, every: float = 1.0):
        from pathlib import Path

        self.directory, self.place, self.total, self.every = Path(directory), place, int(total), every
        self.base = 0  # cell-samples of this rank's cells finished before the current trainer
        self._written = self._read = -1e9
        self._sum = 0

    def path(self, rank: int):
        return self.directory / f"progress.rank{rank}.json"

    def publish(self, cell_samples: int, force: bool = False) -> None:
        """Record that this rank has trained ``base + cell_samples`` cell-samples (throttled unless ``force``)."""
        import json
        import time

        now = time.monotonic()
        if not force and now - self._written < self.every:
            return
        self._written = now
        tmp = self.path(self.place.rank).with_name(f".tmp-progress.rank{self.place.rank}.json")
        tmp.write_text(json.dumps({"cell_samples": int(self.base + cell_samples)}))
        os.replace(tmp, self.path(self.place.rank))

    def global_count(self, fresh: bool = False) -> int:
        """The sum over ranks of their last published counts (re-read at most every ``every`` seconds, or now
        with ``fresh``)."""
        import json
        import time

        now = time.monotonic()
        if fresh or now - self._read >= self.every:
            self._read, total = now, 0
            for r in range(self.place.world_size):
                try:
                    total += int(json.loads(self.path(r).read_text())["cell_samples"])
                except (FileNotFoundError, ValueError, KeyError):
                    pass  # that rank has not published yet
            self._sum = total
        return self._sum

    def postfix(self) -> str:
        from tqdm import tqdm

        return f"{tqdm.format_sizeof(self.global_count())}/{tqdm.format_sizeof(self.total)}"

    def remove_files(self) -> None:
        for r in range(self.place.world_size):
            self.path(r).unlink(missing_ok=True)


def under_torchrun() -> bool:
    """True when a launcher (torchrun) set ``WORLD_SIZE``, even to 1."""
    return "WORLD_SIZE" in os.environ


def launched() -> bool:
    """True when torchrun (or another launcher setting ``WORLD_SIZE`` > 1) started this process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device: str = "cpu") -> Place:
    """Join the process group when launched by torchrun (idempotent); the backend is NCCL for a CUDA ``device``,
    gloo otherwise. Returns this process's :class:`Place` (rank 0 of 1 without a launcher)."""
    if not launched():
        return Place()
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if str(device).startswith("cuda") else "gloo"
        if backend == "nccl":
            import torch

            torch.cuda.set_device(torch.device(device))  # NCCL's collectives run on this rank's own GPU
        dist.init_process_group(backend=backend)
    return Place(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def barrier(place: Place) -> None:
    """Wait for every rank (no-op in a single process)."""
    if place.distributed:
        import torch.distributed as dist

        dist.barrier()


def log(place: Place, message: str) -> None:
    """A progress line on stderr, prefixed with the rank in a distributed job (every line of a multi-line message).

    The ranks share torchrun's stderr, so the line goes out in one write: a pipe or file takes a write of up to
    PIPE_BUF (4096) bytes whole, and Python's stderr on a pipe is unbuffered, where ``print`` writes the text and its
    newline separately and another rank's line could land between them. On a terminal the line starts by clearing
    the current one (``\r`` + erase line), as ``tqdm.write`` does, so it never continues rank 0's progress bar (the
    bar redraws below at its next update)."""
    prefix = f"[rank {place.rank}/{place.world_size}] " if place.distributed else ""
    write_lines([prefix + line for line in (message.splitlines() or [""])])


def write_lines(lines: list[str], stream=None) -> None:
    """``lines`` on ``stream`` (stderr) in one write, each ending in a newline (see :func:`log`)."""
    stream = sys.stderr if stream is None else stream
    text = "".join(line + "\n" for line in lines)
    try:
        tty = stream.isatty()
    except (AttributeError, ValueError):
        tty = False
    stream.write(("\r\x1b[2K" if tty else "") + text)
    stream.flush()


def finish(place: Place) -> None:
    """Leave the process group at the end of a command."""
    if place.distributed:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


__all__ = ["Place", "under_torchrun", "launched", "init", "barrier", "log", "write_lines", "finish"]
