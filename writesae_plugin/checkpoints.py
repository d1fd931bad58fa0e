"""Crash-safe training output: atomic files and directories, checkpoint validation, ``--resume latest``.

A checkpoint ``OUT/checkpoints/<samples>/`` is written into a temporary directory beside it, every file
fsynced, then renamed into place; ``manifest.json`` (written last, inside the temporary directory) lists every
file with its size and SHA-256. A directory without a valid manifest, or whose files do not match it, is torn
and never resumed from. Layout::

    cfg.json, sae_weights.safetensors        the SAE at this step in the site's real units: SAE.load_from_disk
    training_sae/                            the training SAE exactly as it trains (normalised units)
    trainer_state.pt, sparsity.safetensors   SAELens' trainer state (optimizer, scheduler, dead-atom counters)
    activation_scaler.json                   the input normalisation scale (SAELens' format)
    data_state.json, data_state.safetensors  the data stream's position (contexts consumed, shuffle buffer, RNG)
    run.json                                 what the run was (to refuse resuming another one) and its progress
    manifest.json                            files, sizes, hashes: present = complete
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

MANIFEST = "manifest.json"
FORMAT = "writesae-checkpoint/1"
REQUIRED = ("cfg.json", "sae_weights.safetensors", "training_sae/cfg.json", "training_sae/sae_weights.safetensors",
            "trainer_state.pt", "activation_scaler.json", "data_state.json", "run.json")
# a stacked run's checkpoint (cells.train_cells_stacked): every cell in one module, each cell's stream state
REQUIRED_STACKED = ("stacked_sae.safetensors", "trainer_state.pt", "run.json")
JSON_FILES = ("cfg.json", "training_sae/cfg.json", "activation_scaler.json", "data_state.json", "run.json")


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from (missing, torn, or of another run)."""


class OutputDirError(OSError):
    """An output directory that training could not write into."""


# ---------------------------------------------------------------------------------------------- atomic writes
def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    """The process's file-creation mask (read by setting it and setting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``path`` through a temporary file beside it (fsync, rename): the old or the new content, never a
    torn file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".tmp-{path.name}-")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; a plainly written file gets 0666 - umask
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


@contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Yield a temporary directory beside ``final``; on success fsync its files and rename it to ``final``
    (replacing an existing one); on any failure remove it, leaving ``final`` as it was."""
    final = Path(final)
    tmp = final.parent / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        yield tmp
        for root, _, files in os.walk(tmp):
            for name in files:
                with open(Path(root) / name, "rb") as f:
                    os.fsync(f.fileno())
            _fsync_dir(Path(root))
        old = None
        if final.exists():
            old = final.parent / f".old-{final.name}-{uuid.uuid4().hex[:8]}"
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def checkpoint_dir(final: str | Path, hint: str) -> Iterator[Path]:
    """:func:`atomic_dir` for a training checkpoint: a failed write (disk full, ...) raises
    :class:`OutputDirError` saying nothing torn was left, and ``hint`` (how to resume)."""
    try:
        with atomic_dir(final) as tmp:
            yield tmp
    except OSError as e:
        if isinstance(e, OutputDirError):
            raise
        raise OutputDirError(f"writing checkpoint {final} failed ({e.strerror or e}); nothing torn was left, "
                             f"{hint}") from e


def save_stream_state(provider, directory: Path, stem: str) -> dict:
    """A data provider's position (``provider.state_dict()``) in a checkpoint: its tensors (``buffer``,
    ``generator``) to ``directory / {stem}.safetensors``; returns the JSON-able rest."""
    from safetensors.torch import save_file

    state = dict(provider.state_dict())
    tensors = {k: state.pop(k) for k in ("buffer", "generator")}
    save_file({k: v.contiguous().clone() for k, v in tensors.items() if v is not None},
              Path(directory) / f"{stem}.safetensors")
    return state


def load_stream_state(provider, directory: Path, stem: str, saved: dict, check=None) -> None:
    """Restore what :func:`save_stream_state` saved into ``provider`` (``check(state)`` first, if given); a stream
    that cannot continue (other data, ...) raises :class:`CheckpointError`."""
    from safetensors.torch import load_file

    tensors = load_file(Path(directory) / f"{stem}.safetensors")
    state = {**saved, "buffer": tensors.get("buffer"), "generator": tensors["generator"]}
    if check is not None:
        check(state)
    try:
        provider.load_state_dict(state)
    except ValueError as e:
        raise CheckpointError(f"cannot continue the data stream of {directory}: {e}") from None


def remove_stale_temporaries(directory: str | Path) -> None:
    """Remove ``.tmp-*`` / ``.old-*`` leftovers of a killed writer in ``directory``."""
    directory = Path(directory)
    if not directory.is_dir():
        return
    for p in directory.iterdir():
        if p.name.startswith((".tmp-", ".old-")):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def check_writable_dir(path: str | Path, what: str) -> None:
    """Create ``path`` if needed and prove it writable with a probe file, or raise ``OutputDirError``."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputDirError(f"{what} {path} exists and is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-probe-") as f:
            f.write(b"0")
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise OutputDirError(f"{what} {path} is not writable ({e.strerror or e})") from None


def check_output_dir(out: str | Path, checkpoints: bool = True) -> None:
    """Up-front checks of a training output directory: ``OUT`` and ``OUT/checkpoints`` writable; ``OUT/final`` and
    ``OUT/validation.jsonl`` replaceable."""
    out = Path(out)
    check_writable_dir(out, "output directory")
    if checkpoints:
        check_writable_dir(out / "checkpoints", "checkpoint directory")
    final = out / "final"
    if final.exists() and not final.is_dir():
        raise OutputDirError(f"{final} exists and is not a directory (the final SAE is written there)")
    if final.is_dir() and not os.access(final, os.W_OK | os.X_OK):
        raise OutputDirError(f"final SAE directory {final} is not writable")
    for name in ("validation.jsonl", "train_config.json"):
        if (out / name).is_dir():
            raise OutputDirError(f"{out / name} is a directory (training writes a file there)")


# ---------------------------------------------------------------------------------------------- manifest
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(directory: str | Path, **extra: Any) -> None:
    """List every file of ``directory`` with size and hash in ``manifest.json`` (the last file written)."""
    directory = Path(directory)
    files = {}
    for p in sorted(directory.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            files[p.relative_to(directory).as_posix()] = {"bytes": p.stat().st_size, "sha256": _sha256(p)}
    atomic_write_text(directory / MANIFEST, json.dumps({"format": FORMAT, "files": files, **extra}, indent=1))


def validate_checkpoint(path: str | Path) -> dict:
    """Check that ``path`` is a complete checkpoint (manifest, every file present with its size and hash, JSON
    files parse); return its ``run.json``. Raises ``CheckpointError`` naming what is missing."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a checkpoint directory")
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is incomplete (no {MANIFEST}; the run stopped while writing it, or it was "
                              "written by an older version)") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} is torn ({MANIFEST} unreadable: {e})") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path}/{MANIFEST} is not a {FORMAT} manifest")
    required = REQUIRED_STACKED if manifest.get("kind") == "stacked" else REQUIRED
    missing = [f for f in required if f not in files]
    if missing:
        raise CheckpointError(f"{path} is incomplete (its manifest lacks {', '.join(missing)})")
    for name, meta in files.items():
        p = path / name
        if not p.is_file():
            raise CheckpointError(f"{path} is incomplete (missing {name})")
        if p.stat().st_size != meta.get("bytes") or _sha256(p) != meta.get("sha256"):
            raise CheckpointError(f"{path} is torn ({name} does not match its manifest: truncated or modified)")
    for name in (n for n in JSON_FILES if n in files):
        try:
            json.loads((path / name).read_text())
        except ValueError as e:
            raise CheckpointError(f"{path} is torn ({name} does not parse: {e})") from None
    return json.loads((path / "run.json").read_text())


def _numbered(checkpoints: Path) -> list[Path]:
    if not checkpoints.is_dir():
        return []
    return sorted((p for p in checkpoints.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name),
                  reverse=True)


def complete_checkpoints(out: str | Path) -> list[Path]:
    """Complete checkpoints under ``OUT/checkpoints``, newest first."""
    good = []
    for p in _numbered(Path(out) / "checkpoints"):
        try:
            validate_checkpoint(p)
        except CheckpointError:
            continue
        good.append(p)
    return good


def resolve_resume(spec: str | Path, out: str | Path | None = None) -> Path:
    """``"latest"``: the newest complete checkpoint under ``OUT/checkpoints`` (torn ones are skipped with a
    warning); a path: that checkpoint, validated. Raises ``CheckpointError``."""
    if str(spec) == "latest":
        if out is None:
            raise CheckpointError("resume 'latest' needs the output directory")
        root = Path(out) / "checkpoints"
        skipped = []
        for p in _numbered(root):
            try:
                validate_checkpoint(p)
            except CheckpointError as e:
                skipped.append(str(e))
                continue
            if skipped:
                warnings.warn(f"resuming from {p}, skipping {len(skipped)} newer torn checkpoint(s): "
                              + "; ".join(skipped), stacklevel=2)
            return p
        found = f" ({len(skipped)} torn: {'; '.join(skipped)})" if skipped else ""
        raise CheckpointError(f"no complete checkpoint under {root} to resume from{found}")
    path = Path(spec)
    validate_checkpoint(path)
    return path


def _canonical(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def check_identity(ckpt: str | Path, expected: dict, run: dict | None = None) -> None:
    """Refuse to resume ``ckpt`` into a run that differs from it in any key of ``expected``."""
    run = validate_checkpoint(ckpt) if run is None else run
    saved = run.get("identity", {})
    diffs = [f"{key}: checkpoint {saved[key]!r}, this run {_canonical(value)!r}"
             for key, value in expected.items() if key in saved and saved[key] != _canonical(value)]
    if diffs:
        raise CheckpointError(f"checkpoint {ckpt} is from a different run ({'; '.join(diffs)}); resume with the "
                              "checkpointed run's settings or start a new --out")


def prepare_output(out: str | Path, resume: str | Path | None = None,
                   checkpoints: bool = True) -> tuple[Path | None, dict | None]:
    """Everything about ``OUT`` that can fail, checked before any model is loaded: directories writable, stale
    temporaries of a killed writer removed, the checkpoint to resume from resolved and validated (returned with
    its ``run.json``), and a fresh run refused where ``OUT/checkpoints`` holds an earlier run's checkpoints."""
    out = Path(out)
    check_output_dir(out, checkpoints=checkpoints)
    remove_stale_temporaries(out)
    remove_stale_temporaries(out / "checkpoints")
    if resume is None:
        old = _numbered(out / "checkpoints")
        if old:
            raise CheckpointError(f"{out / 'checkpoints'} already holds {len(old)} checkpoint(s) of an earlier run; "
                                  "continue it with --resume latest, or remove them / choose another --out")
        return None, None
    ckpt = resolve_resume(resume, out)
    return ckpt, json.loads((ckpt / "run.json").read_text())


__all__ = ["prepare_output", "CheckpointError", "OutputDirError", "atomic_write_bytes", "atomic_write_text",
           "atomic_dir",
           "check_output_dir", "check_writable_dir", "write_manifest", "validate_checkpoint", "complete_checkpoints",
           "resolve_resume", "check_identity", "remove_stale_temporaries"]
