"""The ``writesae`` command.

Arguments are parsed and checked (ranges, paths, datasets, SAE directories and releases) before anything
heavy is imported: torch, transformers and SAELens load inside a command, after its checks. A user error is
one line, ``writesae <command>: <message>``, on stderr with exit status 2 (1 for an error while running);
``--debug`` shows the traceback instead.

Before a command imports torch, ``OMP_WAIT_POLICY`` is set to ``PASSIVE`` unless the environment sets it: torch's
OpenMP threads otherwise spin while they wait for each other, and on a CPU that other processes keep busy the spinning
threads hold the cores the awaited ones need (``writesae hooks`` on the shipped model, 2 threads on a loaded 2-core
machine: a 36.7 s self-check, 3.8 s with the passive policy, 3.3 s with one thread).
"""

from __future__ import annotations

import argparse
import json
import os
import contextlib
import sys
import warnings
from pathlib import Path

#: HF model types whose writes are Mamba-2's (no separate delta write); mirrors adapters.MAMBA2_MODEL_TYPES
#: (a test keeps them equal; the CLI reads config.json without importing the adapters, which need torch)
MAMBA2_MODEL_TYPES = ("mamba2", "bamba", "nemotron_h", "falcon_h1", "zamba2", "granitemoehybrid")
DATASET_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")
#: document splits and .txt document rules; mirror writesae_plugin.data (a test keeps them equal)
SPLITS = ("train", "validation", "test")
TXT_DOCUMENTS = ("auto", "paragraph", "file", "line")


#: fla's import-time warning on a machine without a triton GPU driver (fla 0.6.0, ``fla.utils.hardware``): expected
#: on every CPU machine with the [fla] extra (its CPU kernels are routed to torch), so the commands silence it
FLA_CPU_WARNING = r"Triton is not supported on current platform, roll back to CPU\.$"


@contextlib.contextmanager
def expected_warnings_silenced():
    """Within it, fla's CPU-platform warning (``FLA_CPU_WARNING``, raised from fla's modules) is not shown; every
    other warning is shown as before (the filter is removed on exit)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=FLA_CPU_WARNING, category=UserWarning, module=r"fla\.")
        yield


def _err(line: str) -> None:
    """One line on stderr in one write, so that under torchrun, where the ranks share stderr, it stays whole; there
    it names its rank, as the ranks' log lines do (``distributed.log``)."""
    from .distributed import write_lines

    world = int(os.environ.get("WORLD_SIZE", "1"))
    prefix = f"[rank {os.environ['RANK']}/{world}] " if world > 1 and "RANK" in os.environ else ""
    write_lines([prefix + line])


#: the shipped Gated DeltaNet demo model (package data), every command's default --model; the path is the one
#: ``demo.run.demo_model_dir()`` gives (a test keeps them equal; that module imports torch)
DEMO_MODEL = Path(__file__).resolve().parent / "assets" / "demo" / "model"
MODEL_HELP = ("local HF model directory or hub id (default: the shipped Gated DeltaNet demo model, "
              "writesae_plugin/assets/demo/model)")


class UsageError(Exception):
    """A user mistake found by a check: printed as one line, exit status 2."""


# ------------------------------------------------------------------------------------------ argument types
def _int_at_least(lo: int, what: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < lo:
            raise argparse.ArgumentTypeError(f"must be {what}, got {value}")
        return value
    parse.__name__ = "int"
    return parse


positive_int = _int_at_least(1, "a positive integer")
nonneg_int = _int_at_least(0, "a non-negative integer")
length_int = _int_at_least(2, "at least 2 tokens")


def _float_in(lo: float | None, hi: float | None, what: str, lo_open: bool = False, hi_open: bool = False):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        bad = value != value or (lo is not None and (value <= lo if lo_open else value < lo)) or \
            (hi is not None and (value >= hi if hi_open else value > hi))
        if bad:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value
    parse.__name__ = "float"
    return parse


#: `writesae train --resample-every` default: on. Measured (benchmarks/RESULTS.md, bench_resample.py): it
#: lowers held-out FVU where atoms die (Mamba-2 demo L3.H1.state: 0.889 -> 0.716, dead 36.5% -> 31.5%) and
#: changes nothing where none die (the other three demo cells: identical results)
RESAMPLE_EVERY = 100

positive_float = _float_in(0.0, float("inf"), "a positive finite number", lo_open=True, hi_open=True)
nonneg_float = _float_in(0.0, float("inf"), "a non-negative finite number", hi_open=True)
open_fraction = _float_in(0.0, 1.0, "strictly between 0 and 1", lo_open=True, hi_open=True)


def split_shares(text: str) -> tuple[float, float, float]:
    """``TRAIN,VALIDATION,TEST`` shares of the documents: percentages summing to 100 (or fractions to 1),
    returned as fractions (what ``writesae_plugin.data.split_contexts`` takes)."""
    try:
        parts = [float(x) for x in text.split(",")]
    except ValueError:
        parts = []
    total = sum(parts)
    if len(parts) != 3 or any(not (p >= 0) or p == float("inf") for p in parts) or not (
            abs(total - 100) < 1e-6 or abs(total - 1) < 1e-9):
        raise argparse.ArgumentTypeError(f"expected three shares TRAIN,VALIDATION,TEST summing to 100 (e.g. 90,5,5), "
                                         f"got {text!r}")
    return tuple(p / total for p in parts)  # type: ignore[return-value]


def rank_range(text: str) -> tuple[int, int]:
    """``LO-HI`` with integers ``0 <= LO < HI`` (an initial-rank stratum of ``install``)."""
    lo, sep, hi = text.partition("-")
    if not sep or not lo.isdigit() or not hi.isdigit() or int(lo) >= int(hi):
        raise argparse.ArgumentTypeError(f"expected a rank range LO-HI with integers 0 <= LO < HI, got {text!r}")
    return int(lo), int(hi)


# ------------------------------------------------------------------------------------------ path checks
def _looks_local(spec: str) -> bool:
    """A string meant as a local path rather than a hub id (``org/name``)."""
    return (spec.startswith((".", "/", "~")) or os.sep != "/" and os.sep in spec or spec.count("/") > 1
            or spec.endswith("/") or Path(spec).suffix in DATASET_SUFFIXES)


def check_model_arg(spec: str | None, flag: str = "--model") -> dict | None:
    """A local model directory must exist and hold config.json (returned, parsed); a hub id passes unchecked."""
    if spec is None:
        return None
    path = Path(spec).expanduser()
    if not path.exists():
        if _looks_local(spec):
            raise UsageError(f"{flag} {spec}: no such model directory")
        return None
    if not path.is_dir() or not (path / "config.json").is_file():
        raise UsageError(f"{flag} {spec}: not a model directory (no config.json; expected what "
                         "save_pretrained writes)")
    try:
        return json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(f"{flag} {spec}: config.json is not readable JSON ({e})") from None


def check_out_dir(spec: str, flag: str = "--out") -> None:
    """``spec`` is a writable directory or can be created (its first existing ancestor is a writable dir)."""
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UsageError(f"{flag} {spec}: exists and is not a directory")
        if not os.access(path, os.W_OK | os.X_OK):
            raise UsageError(f"{flag} {spec}: directory is not writable")
        return
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(f"{flag} {spec}: cannot be created, {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {spec}: cannot be created, {parent} is not writable")


def check_dir_arg(spec: str | None, flag: str) -> None:
    if spec is not None and not Path(spec).expanduser().is_dir():
        raise UsageError(f"{flag} {spec}: no such directory")


def _check_text_file(path: Path, text_column: str, shown: str) -> None:
    import codecs

    if path.stat().st_size == 0:
        raise UsageError(f"--dataset {shown}: {path.name} is empty")
    if path.suffix == ".parquet":
        return
    decoder = codecs.getincrementaldecoder("utf-8")()
    seen = 0
    first_line = ""
    has_text = False
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            try:
                text = decoder.decode(chunk)
            except UnicodeDecodeError as e:
                raise UsageError(f"--dataset {shown}: {path.name} is not UTF-8 text (byte {seen + e.start})") from None
            seen += len(chunk)
            has_text = has_text or bool(text.strip())
            if not first_line and text.strip():
                first_line = text.lstrip().split("\n", 1)[0]
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise UsageError(f"--dataset {shown}: {path.name} is not UTF-8 text (truncated at the end)") from None
    if not has_text:
        raise UsageError(f"--dataset {shown}: {path.name} holds no text (only whitespace)")
    if path.suffix == ".jsonl":
        try:
            row = json.loads(first_line)
        except json.JSONDecodeError as e:
            raise UsageError(f"--dataset {shown}: {path.name} is not JSON lines (first line: {e})") from None
        if not isinstance(row, dict) or text_column not in row:
            cols = sorted(row) if isinstance(row, dict) else type(row).__name__
            raise UsageError(f"--dataset {shown}: {path.name} rows have no {text_column!r} field (found {cols}); "
                             "choose it with --text-column")


def check_dataset_arg(spec: str | None, text_column: str = "text") -> None:
    """A local dataset file or directory must exist, hold .txt/.jsonl/.json/.parquet files of one kind, and
    each file must be non-empty UTF-8 text (JSON lines: with the text column); a hub name passes."""
    if spec is None:
        return
    path = Path(spec).expanduser()
    if not path.exists():
        if _looks_local(spec):
            raise UsageError(f"--dataset {spec}: no such file or directory")
        offline = [v for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
                   if os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")]
        if offline:
            raise UsageError(f"--dataset {spec}: no such file or directory, and not loadable from the Hugging Face "
                             f"Hub with {offline[0]} set (give a local .txt/.jsonl/.parquet file or directory)")
        return
    files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")) if path.is_dir() \
        else [path]
    if not files:
        raise UsageError(f"--dataset {spec}: the directory holds no file")
    kinds = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
    exts = sorted({p.suffix for p in files})
    if not set(exts) <= set(kinds) or len({kinds[e] for e in exts}) != 1:
        raise UsageError(f"--dataset {spec}: expected .txt, .jsonl/.json or .parquet files of one kind, found "
                         f"{exts}")
    for p in files:
        _check_text_file(p, text_column, spec)


def _per_atom_line(m: dict | None) -> str:
    """The per-atom mean win rate (atom_act vs delete) of a substitution summary, as a sentence."""
    if not m or not m.get("n_clusters"):
        return f"per-atom mean: no atom has >= {(m or {}).get('min_count', 5)} firings (fire more: --contexts)"
    interval = "" if m["lo"] != m["lo"] else f" [{m['lo']:.1%}, {m['hi']:.1%}]"  # NaN: a single atom, no interval
    return (f"per-atom mean win rate {m['mean']:.1%}{interval} over {m['n_clusters']} atoms with "
            f">= {m['min_count']} firings")


def _saelens_release(release: str) -> bool:
    """Whether SAELens' directory of pretrained SAEs (its ``pretrained_saes.yaml``) names ``release``, read as text
    (a top-level key), without importing SAELens."""
    import importlib.util

    spec = importlib.util.find_spec("sae_lens")
    if spec is None or not spec.submodule_search_locations:
        return False
    directory = Path(list(spec.submodule_search_locations)[0]) / "pretrained_saes.yaml"
    try:
        text = directory.read_text(encoding="utf-8")
    except OSError:
        return True  # cannot tell here: SAELens checks when it loads
    return f"\n{release}:" in "\n" + text


def sae_cfg(spec: str, flag: str = "--sae") -> dict | None:
    """The ``cfg.json`` of an SAE given as a directory or as ``RELEASE:SAE_ID`` of a shipped/local release,
    read without loading it (None for another SAELens release: checked when it loads)."""
    from .registry import packaged_release_dirs

    path = Path(spec).expanduser()
    if path.is_dir():
        cfg_file = path / "cfg.json"
        if not cfg_file.is_file():
            raise UsageError(f"{flag} {spec}: not an SAE directory (no cfg.json)")
    elif ":" in spec and not path.exists():
        release, sae_id = spec.split(":", 1)
        rel_dir = packaged_release_dirs().get(release)
        if rel_dir is None:
            if "/" in release or _saelens_release(release):  # a Hugging Face repo or SAELens' own: checked on load
                return None
            raise UsageError(f"{flag} {spec}: unknown release {release!r}; the shipped releases are "
                             f"{sorted(packaged_release_dirs())} (or give a SAELens release, a Hugging Face repo "
                             "ORG/NAME:SAE_ID, or an SAE directory)")
        meta_file = rel_dir / "release.json"
        saes = json.loads(meta_file.read_text()).get("saes", {}) if meta_file.is_file() else {}
        saes = saes or {p.name: p.name for p in rel_dir.iterdir() if (p / "cfg.json").is_file()}
        if sae_id not in saes:
            raise UsageError(f"{flag} {spec}: release {release!r} has no SAE {sae_id!r}; it has {sorted(saes)}")
        cfg_file = rel_dir / saes[sae_id] / "cfg.json"
    elif path.exists():
        raise UsageError(f"{flag} {spec}: not a directory (give an SAE directory or RELEASE:SAE_ID)")
    else:
        raise UsageError(f"{flag} {spec}: no such SAE directory (give an SAE directory or RELEASE:SAE_ID)")
    try:
        return json.loads(cfg_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(f"{flag} {spec}: cfg.json is not readable JSON ({e})") from None


def check_atoms(atoms, cfg: dict | None, spec: str, flag: str = "--atoms") -> None:
    if atoms and cfg is not None and cfg.get("d_sae") is not None:
        bad = [a for a in atoms if not 0 <= a < cfg["d_sae"]]
        if bad:
            raise UsageError(f"{flag} {bad}: out of range for {spec} (atoms 0..{cfg['d_sae'] - 1})")


def check_sae_fit(model, sae, spec: str, per_head: bool = False) -> None:
    """The SAE was made for this model: family, d_k, d_v, heads, a recurrent layer (after the model loads,
    before any experiment runs)."""
    from .host import _family_key

    cfg, m = sae.cfg, model.cfg
    family = getattr(cfg, "family", None)
    if family is None:  # not a WriteSAE: SAELens' own SAEs have no write-site geometry to check here
        raise UsageError(f"--sae {spec}: not a WriteSAE (architecture {getattr(cfg, 'architecture', '?')!r})")
    problems = []
    if family and _family_key(family) != _family_key(m.family):
        problems.append(f"family {family} (model: {m.family})")
    if (cfg.d_k, cfg.d_v) != (m.d_k, m.d_v):
        problems.append(f"d_k x d_v = {cfg.d_k} x {cfg.d_v} (model: {m.d_k} x {m.d_v})")
    if cfg.n_heads != m.n_heads:
        problems.append(f"{cfg.n_heads} value heads (model: {m.n_heads})")
    if cfg.layer is not None and cfg.layer not in m.recurrent_layers:
        problems.append(f"layer {cfg.layer} (model's recurrent layers: {list(m.recurrent_layers)})")
    if cfg.head is not None and not 0 <= cfg.head < m.n_heads:
        problems.append(f"head {cfg.head}")
    if problems:
        raise UsageError(f"--sae {spec} does not fit this model: " + "; ".join(problems))
    if per_head and cfg.head is None:
        raise UsageError(f"--sae {spec}: this command needs a per-head WriteSAE (cfg.head set)")


def check_layer_head(model, layer: int | None, head: int | None) -> None:
    m = model.cfg
    if layer is not None and layer not in m.recurrent_layers:
        raise UsageError(f"--layer {layer}: not a recurrent layer; choose from {list(m.recurrent_layers)}")
    if head is not None and not 0 <= head < m.n_heads:
        raise UsageError(f"--head {head}: out of range (value heads 0..{m.n_heads - 1})")


def _model_config(spec: str | None) -> dict | None:
    try:
        return check_model_arg(spec)
    except UsageError:
        return None


def validate_train(args) -> None:
    """Checks of ``writesae train``'s arguments before the model loads (shared with the train command)."""
    check_device_arg(args.device)
    if (args.layer is None) == (args.layers is None):
        raise UsageError("give --layer L (one dictionary) or --layers L1,L2,... (one per layer and head)")
    if args.layers is None and (args.heads is not None or args.shared_heads):
        raise UsageError("--heads and --shared-heads go with --layers (with --layer, use --head)")
    if args.layers is not None and args.head is not None:
        raise UsageError("--head goes with --layer (with --layers, use --heads)")
    if args.layers is not None and args.shared_heads and args.heads is not None:
        raise UsageError("--shared-heads trains one dictionary on every head; do not also give --heads")
    from . import distributed

    if distributed.launched() and getattr(args, "parallel", None) is None:
        raise UsageError("under torchrun, train needs --parallel cells or --parallel data (with --layers)")
    if getattr(args, "parallel", None) is not None and not distributed.under_torchrun():
        raise UsageError(f"--parallel {args.parallel} shares the work between torchrun's processes; launch with "
                         "torchrun --nproc-per-node N -m writesae_plugin.cli train ... (or drop --parallel)")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if getattr(args, "parallel", None) == "data" and args.batch_size % world:
        raise UsageError(f"--parallel data splits each batch over the {world} ranks: --batch-size {args.batch_size} "
                         f"is not a multiple of {world}")
    if getattr(args, "parallel", None) == "data" and args.total_samples % world:
        raise UsageError(f"--parallel data splits each batch over the {world} ranks, the last (partial) one too: "
                         f"--total-samples {args.total_samples} is not a multiple of {world}")
    if getattr(args, "parallel", None) is not None and args.layers is None:
        raise UsageError(f"--parallel {args.parallel} trains the cells of --layers L1,L2,...; give --layers")
    if args.layers is not None and args.resume not in (None, "latest"):
        raise UsageError("with --layers, --resume takes 'latest' (each unfinished cell continues from its newest "
                         "checkpoint)")
    for flag, value, lo in (("--layer", 0 if args.layer is None else args.layer, 0), ("--d-sae", args.d_sae, 1),
                            ("--k", args.k, 1),
                            ("--decoder-rank", args.decoder_rank, 0), ("--context-length", args.context_length, 2),
                            ("--total-samples", args.total_samples, 1), ("--batch-size", args.batch_size, 1),
                            ("--aux-k", args.aux_k, 0), ("--resample-every", args.resample_every, 0),
                            ("--dead-feature-window", args.dead_feature_window, 1),
                            ("--val-contexts", args.val_contexts, 1), ("--val-every", args.val_every, 1)):
        if value < lo:
            raise UsageError(f"{flag} {value}: must be at least {lo}")
    if args.head is not None and args.head < 0:
        raise UsageError(f"--head {args.head}: must be a value-head index >= 0 or 'all'")
    if args.k > args.d_sae:
        raise UsageError(f"--k {args.k}: more active atoms than atoms (--d-sae {args.d_sae})")
    if not args.lr > 0 or args.lr == float("inf"):
        raise UsageError(f"--lr {args.lr}: must be a positive finite number")
    config = check_model_arg(args.model)
    if args.write_mode == "delta" and config is not None and (
            config.get("model_type") in MAMBA2_MODEL_TYPES or "ssm_cfg" in config):
        raise UsageError("--write-mode delta: Mamba-2 writes have one mode (the transition never erases, so the "
                         "raw and delta writes coincide); use --write-mode raw")
    if (args.dataset is None) == (args.store is None):
        raise UsageError("give exactly one data source: --dataset (stream text through the model) or --store "
                         "(an activation store from `writesae extract`)")
    if args.val_store is not None and args.store is None:
        raise UsageError("--val-store goes with --store (streaming from --dataset validates on its validation split)")
    if args.store is not None:
        check_store_arg(args.store)
        if args.val_store is not None:
            check_store_arg(args.val_store, "--val-store")
    else:
        check_dataset_arg(args.dataset, args.text_column)
    check_out_dir(args.out)


def check_store_arg(spec: str, flag: str = "--store") -> dict:
    """A complete activation store (its manifest, parsed); a missing or unfinished one is a usage error."""
    path = Path(spec).expanduser()
    manifest = path / "manifest.json"
    if not manifest.is_file():
        raise UsageError(f"{flag} {spec}: not an activation store (no manifest.json); make one with "
                         "`writesae extract`")
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(f"{flag} {spec}: manifest.json is not readable JSON ({e})") from None
    if not data.get("complete"):
        raise UsageError(f"{flag} {spec}: the extraction did not finish; rerun the same `writesae extract` "
                         "command to complete it")
    return data


def check_device_arg(spec: str) -> None:
    """``--device`` is well-formed and, for ``cuda`` / ``cuda:N``, there is such a GPU (before any loading)."""
    import re

    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", spec):
        raise UsageError(f"--device {spec}: expected auto, cpu, cuda or cuda:N")
    if spec.startswith("cuda"):  # a named GPU must exist (this imports torch; auto and cpu are checked for free)
        resolve_device(spec)


def validate_extract(args) -> None:
    check_device_arg(args.device)
    if args.contexts_per_shard % args.forward_batch:
        raise UsageError(f"--contexts-per-shard {args.contexts_per_shard}: must be a multiple of --forward-batch "
                         f"{args.forward_batch}")
    config = check_model_arg(args.model)
    if args.write_mode == "delta" and config is not None and (
            config.get("model_type") in MAMBA2_MODEL_TYPES or "ssm_cfg" in config):
        raise UsageError("--write-mode delta: Mamba-2 writes have one mode; use --write-mode raw")
    check_dataset_arg(args.dataset, args.text_column)
    check_out_dir(args.out)


def _validate_data(args) -> None:
    check_model_arg(args.model)
    check_dataset_arg(args.dataset, args.text_column)
    check_out_dir(args.out)


def _validate_sae_experiment(args) -> None:
    _validate_data(args)
    cfg = sae_cfg(args.sae)
    check_atoms(args.atoms, cfg, args.sae)
    if getattr(args, "t0", None) is not None and not 0 <= args.t0 < args.context_length - 1:
        raise UsageError(f"--t0 {args.t0}: the perturbed position must be in 0..{args.context_length - 2} "
                         f"(--context-length {args.context_length})")


def _validate_pairs(args) -> None:
    check_model_arg(args.model)
    check_dataset_arg(args.dataset, args.text_column)
    check_out_dir(args.out)
    for spec in args.sae or []:
        cfg = sae_cfg(spec)
        check_atoms(getattr(args, "atoms", None), cfg, spec)
    if args.task == "copy" and not 1 <= args.source_pos < args.length - 2:
        raise UsageError(f"--source-pos {args.source_pos}: the copy task needs 1 <= source-pos < length - 2 "
                         f"= {args.length - 2}")
    if args.command == "path-patch" and (args.layer is None) != (args.head is None):
        raise UsageError("--layer and --head go together (or give neither: the write with the largest effect)")


def _validate_make_demo_model(args) -> None:
    check_out_dir(args.out)
    check_dir_arg(args.tokenizer, "--tokenizer")


def _validate_make_demo_release(args) -> None:
    check_model_arg(args.model)
    check_out_dir(args.out)


VALIDATORS = {"hooks": lambda a: check_model_arg(a.model), "train": validate_train, "extract": validate_extract,
              "substitute": _validate_sae_experiment, "closed-form": _validate_sae_experiment,
              "attribute": _validate_sae_experiment, "install": _validate_data,
              "make-demo-model": _validate_make_demo_model, "make-demo-release": _validate_make_demo_release,
              "patch": _validate_pairs, "attribution-patch": _validate_pairs, "path-patch": _validate_pairs,
              "circuit": _validate_pairs, "edit-atoms": _validate_pairs,
              "demo": lambda a: check_out_dir(a.out), "dashboard": lambda a: _validate_dashboard(a)}


def resolve_device(spec: str) -> str:
    """``--device``: ``auto`` is ``cuda:LOCAL_RANK`` (torchrun's local rank, 0 alone) when CUDA is available, else
    ``cpu``; ``cuda`` is ``cuda:LOCAL_RANK`` and needs CUDA; ``cuda:N`` needs a GPU N (one-line errors otherwise).
    The model forward and the SAE training (parameters, optimizer, batches, counters) run there."""
    import torch

    local = int(os.environ.get("LOCAL_RANK", "0"))
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if not spec.startswith("cuda"):
        return spec
    if not torch.cuda.is_available():
        raise UsageError(f"--device {spec}: this torch has no CUDA device; use --device cpu (or auto)")
    count = torch.cuda.device_count()
    if spec != "cuda" and int(os.environ.get("LOCAL_WORLD_SIZE", "1")) > 1:
        raise UsageError(f"--device {spec}: under torchrun with several processes per node each rank takes GPU "
                         "LOCAL_RANK; use --device cuda (or auto)")
    index = local if spec == "cuda" else int(spec.split(":")[1])
    if index >= count:
        raise UsageError(f"--device {spec}: GPU {index} does not exist ({count} visible: cuda:0..cuda:{count - 1})"
                         + ("; run at most that many processes per node" if spec == "cuda" else ""))
    return f"cuda:{index}"


def _load(model_path: str | None, device: str = "cpu"):
    """The hooked model of ``--model`` (None: the shipped demo model) and its description."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .adapters import hook_model

    if model_path is None:
        if not (DEMO_MODEL / "config.json").is_file():
            raise UsageError(f"the shipped demo model is not in this install ({DEMO_MODEL}); give --model")
        model_path = str(DEMO_MODEL)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # errors stay one line; the CLI prints its own progress
    from .adapters import route_cpu_to_torch

    route_cpu_to_torch()  # with the [fla] extra: imports fla (its models join the Auto classes); CPU kernels: torch
    hf = AutoModelForCausalLM.from_pretrained(model_path).to(device)
    try:
        tok = AutoTokenizer.from_pretrained(model_path)
    except (OSError, ValueError):
        tok = None
    return hook_model(hf.eval(), tokenizer=tok), model_path


def cmd_hooks(args) -> int:
    import torch

    from .selfcheck import run_selfcheck

    torch.manual_seed(args.seed)
    model, desc = _load(args.model)
    print(f"model: {desc}")
    print(f"family: {model.cfg.family}; recurrent layers {list(model.cfg.recurrent_layers)}; "
          f"value heads {model.cfg.n_heads} (key heads {model.cfg.n_key_heads}); d_k={model.cfg.d_k} "
          f"d_v={model.cfg.d_v}\n")
    first = model.cfg.recurrent_layers[0]
    print(f"hook inventory (layer {first} shown; every recurrent layer has the same hooks):")
    shown = [(name, desc) for name, desc in model.hook_inventory() if name.startswith(f"blocks.{first}.")]
    for name, desc in shown:
        print(f"  {name:42s} {desc}")
    from .adapters.base import SHAPE_SYMBOLS, shape_symbols

    used = {sym for _, desc in shown for sym in shape_symbols(desc)}
    print("shapes: " + "; ".join(f"{sym} = {meaning}" for sym, meaning in SHAPE_SYMBOLS.items() if sym in used))
    tokens = torch.randint(0, model.cfg.d_vocab, (args.batch, args.length))
    print(f"\nself-check on random tokens [{args.batch}, {args.length}]:")
    result = run_selfcheck(model, tokens, progress=True)  # a bar on stderr, one step per check
    print(result.table())
    print("\nall checks passed" if result.ok else "\nSOME CHECKS FAILED")
    return 0 if result.ok else 1


def _positions(text: str):
    if text in ("all", "last"):
        return text
    kind, _, n = text.partition(":")
    if kind in ("stride", "random") and n.isdigit() and int(n) > 0:
        return (kind, int(n))
    raise argparse.ArgumentTypeError(f"positions must be all, last, stride:N or random:N, got {text!r}")


def _head(text: str):
    if text == "all":
        return None
    if text.isdigit():
        return int(text)
    raise argparse.ArgumentTypeError(f"head must be a value-head index or 'all', got {text!r}")


def _prune_empty_dirs(path: Path) -> None:
    """Remove ``path`` and the directories under it if no file is anywhere in them (never a file)."""
    if not path.is_dir():
        return
    for root, dirs, files in os.walk(path, topdown=False):
        if not files and not os.listdir(root):
            os.rmdir(root)


def cmd_train(args) -> int:
    """``writesae train``; a run refused or failed before it wrote anything leaves no empty ``--out`` behind (an
    ``--out`` that existed before is never touched)."""
    made = Path(args.out).absolute()  # the highest directory of --out that this run would create
    while not made.parent.exists():
        made = made.parent
    existed = made.exists()
    rc = None
    try:
        rc = _cmd_train(args)
        return rc
    finally:
        if not existed and rc != 0:
            _prune_empty_dirs(made)


def _cmd_train(args) -> int:
    import itertools
    import json

    from .checkpoints import CheckpointError, OutputDirError, check_identity, prepare_output

    layout = args.layout
    if layout == "auto":
        layout = "factors" if args.site == "write" and args.encoder == "bilinear" else "dense"
    if args.layers is not None:
        from .store import StoreError

        try:
            return _train_cells(args)
        except StoreError as e:
            raise UsageError(str(e)) from None
    try:  # output dirs writable, the checkpoint to resume complete and of this run: before loading any model
        ckpt, run = prepare_output(args.out, args.resume)
        if ckpt is not None:
            check_identity(ckpt, {
                "layer": args.layer, "head": args.head, "site": args.site, "write_mode": args.write_mode,
                "input_layout": layout, "normalize": not args.no_normalize, "d_sae": args.d_sae, "k": args.k,
                "encoder": args.encoder, "decoder_rank": None if args.decoder_rank == 0 else args.decoder_rank,
                "activation": args.activation, "aux_k": min(args.aux_k, args.d_sae),
                "resample_every": args.resample_every, "total_samples": args.total_samples,
                "batch_size": args.batch_size, "lr": args.lr, "positions": args.positions, "layers": args.layer,
                "heads": None if args.head is None else [args.head]}, run)
    except (CheckpointError, OutputDirError) as e:
        _err(f"writesae train: {e}")
        return 2

    import torch

    from .data import ActivationProvider, SiteSpec

    torch.manual_seed(args.seed)
    if args.store is not None:
        from .store import StoreError

        try:
            return _train_from_store(args, layout, ckpt)
        except StoreError as e:  # a store that does not fit this run: a usage error, found before training
            raise UsageError(str(e)) from None
    model, desc = _load(args.model, resolve_device(args.device))
    if model.tokenizer is None:
        _err(f"writesae train: {desc} has no tokenizer; a text dataset needs one")
        return 2
    cfg_m = model.cfg
    if args.layer not in cfg_m.recurrent_layers:
        _err(f"writesae train: --layer {args.layer} is not a recurrent layer; choose from "
             f"{list(cfg_m.recurrent_layers)}")
        return 2
    if args.head is not None and not 0 <= args.head < cfg_m.n_heads:
        _err(f"writesae train: --head {args.head} out of range (0..{cfg_m.n_heads - 1} or all)")
        return 2
    texts = _documents(args)
    contexts = _split_stream(model, args, "train", texts)
    val_contexts = list(itertools.islice(_split_stream(model, args, "validation", texts), args.val_contexts))
    if len(val_contexts) < args.val_contexts:
        raise UsageError(f"--dataset {args.dataset}: the validation split gives {len(val_contexts)} contexts of "
                         f"{args.context_length} tokens, fewer than --val-contexts {args.val_contexts} (give more "
                         "documents, lower --val-contexts or --context-length, or change --splits)")
    heads = None if args.head is None else [args.head]
    spec = SiteSpec(layer=args.layer, site=args.site, heads=heads, positions=args.positions,
                    write_mode=args.write_mode, layout=layout)
    # training reads the train split, validation the first --val-contexts of the validation split (documents
    # never shared); context i of a split's stream is sampled at the positions a store extracted from that
    # split with this seed holds
    provider = ActivationProvider(model, contexts, spec, batch_size=args.batch_size, seed=args.seed,
                                  normalize=not args.no_normalize)
    val_provider = ActivationProvider(model, iter(val_contexts), spec, batch_size=args.batch_size,
                                      buffer_batches=2, seed=args.seed + 1, position_seed=args.seed,
                                      drop_last=False)
    val_batches = list(val_provider)
    dims = {"d_k": cfg_m.d_k, "d_v": cfg_m.d_v, "n_heads": cfg_m.n_heads, "family": cfg_m.family,
            "hook": model.hook_prefix(args.layer) + f"hook_{args.site}",
            "hf_module": model.family.hf_module_name(model.hf_model, args.layer)}
    return _fit(args, layout, ckpt, provider, val_batches, dims, desc, args.context_length)


def _train_from_store(args, layout: str, ckpt) -> int:
    """``writesae train --store``: the same training, reading the cell from an activation store (no model
    forward; with --model, the store must come from that model)."""
    from .data import SiteSpec
    from .store import ActivationStore, StoreProvider, weights_sha256

    store = ActivationStore(args.store)
    info = store.model
    if args.layer not in info["recurrent_layers"]:
        raise UsageError(f"--layer {args.layer} is not a recurrent layer of the store's model; choose from "
                         f"{info['recurrent_layers']}")
    if args.head is not None and not 0 <= args.head < info["n_heads"]:
        raise UsageError(f"--head {args.head} out of range (0..{info['n_heads'] - 1} or all)")
    heads = None if args.head is None else [args.head]
    sha = None
    if args.model is not None:
        model, _ = _load(args.model)
        sha = weights_sha256(model.hf_model)
        del model
    store.check_cell(args.layer, heads, args.site, args.write_mode, model_sha256=sha)
    if store.config["heads"] is not None and heads is None and sorted(store.heads) != list(range(info["n_heads"])):
        raise UsageError(f"--head all: the store holds heads {store.heads} only")
    val_store = None if args.val_store is None else ActivationStore(args.val_store)
    if val_store is None:  # hold out the store's first contexts
        if store.n_contexts <= args.val_contexts:
            raise UsageError(f"--store {args.store}: {store.n_contexts} contexts, not more than --val-contexts "
                             f"{args.val_contexts}")
    else:
        _check_val_store(store, val_store, args)
    spec = SiteSpec(layer=args.layer, site=args.site, heads=heads,
                    positions=store.positions,
                    write_mode=args.write_mode, layout=layout, skip_first=store.config["skip_first"])
    provider = StoreProvider(store, spec, batch_size=args.batch_size, seed=args.seed, normalize=not args.no_normalize,
                             first_context=0 if val_store is not None else args.val_contexts)
    val_batches = list(StoreProvider(val_store or store, spec, batch_size=args.batch_size, buffer_batches=2,
                                     seed=args.seed + 1, n_contexts=args.val_contexts, drop_last=False))
    key = str(args.layer)
    dims = {"d_k": info["d_k"], "d_v": info["d_v"], "n_heads": info["n_heads"], "family": info["family"],
            "hook": info["hook_prefixes"][key] + f"hook_{args.site}", "hf_module": info["hf_module_names"][key]}
    return _fit(args, layout, ckpt, provider, val_batches, dims, info["path"],
                store.config["data"].get("context_length"))


def _train_cells(args) -> int:
    """``writesae train --layers ...``: every (layer, head) cell (or one shared per layer) from one extraction;
    under torchrun with ``--parallel cells``, the extraction and the cells shared out over the ranks."""
    from . import distributed

    place = distributed.init(resolve_device(args.device))  # NCCL for a GPU rank, gloo on the CPU
    try:
        return _train_cells_on(args, place)
    finally:
        distributed.finish(place)


def _train_cells_on(args, place) -> int:
    import math

    from . import distributed
    from .cells import CellTraining, store_cells, train_cells
    from .store import ActivationStore

    t = CellTraining(d_sae=args.d_sae, k=args.k, encoder=args.encoder,
                     decoder_rank=None if args.decoder_rank == 0 else args.decoder_rank, activation=args.activation,
                     aux_k=args.aux_k, resample_every=args.resample_every, write_mode=args.write_mode,
                     dead_feature_window=args.dead_feature_window,
                     layout=args.layout, total_samples=args.total_samples, batch_size=args.batch_size, lr=args.lr,
                     val_contexts=args.val_contexts, val_every=args.val_every, normalize=not args.no_normalize,
                     seed=args.seed)
    out = Path(args.out)
    if args.store is not None:
        store = ActivationStore(args.store)
        val_store = None if args.val_store is None else ActivationStore(args.val_store)
        if val_store is not None:
            for layer in args.layers:
                args.layer, args.head = layer, None
                _check_val_store(store, val_store, args)
    else:  # extract the train split (enough contexts for every cell) and the validation split first
        from .store import ExtractConfig, extract

        model, desc = _load(args.model, resolve_device(args.device))
        cfg_m = model.cfg
        bad = [layer for layer in args.layers if layer not in cfg_m.recurrent_layers]
        if bad:
            raise UsageError(f"--layers {bad} are not recurrent layers; choose from {list(cfg_m.recurrent_layers)}")
        if args.heads is not None and any(h >= cfg_m.n_heads for h in args.heads):
            raise UsageError(f"--heads {args.heads} out of range (0..{cfg_m.n_heads - 1} or all)")
        from .data import SiteSpec, select_positions

        spec = SiteSpec(layer=args.layers[0], positions=args.positions)
        per_context = len(select_positions(spec, args.context_length)) * (cfg_m.n_heads if args.shared_heads else 1)
        n_train = math.ceil(args.total_samples / max(per_context, 1)) + 8
        data = {"dataset": str(args.dataset), "text_column": args.text_column, "context_length": args.context_length,
                "splits": list(args.splits), "documents": args.documents, "data_seed": args.data_seed}
        common = dict(layers=list(args.layers), heads=args.heads, site=args.site, write_mode=args.write_mode,
                      positions=args.positions, seed=args.seed)
        texts = _documents(args)
        store = ActivationStore(extract(model, _split_stream(model, args, "train", texts), out / "store",
                                        ExtractConfig(**common, data={**data, "split": "train"}),
                                        max_contexts=n_train, model_path=desc, place=place,
                                        progress=place.main))
        val_store = ActivationStore(extract(model, _split_stream(model, args, "validation", texts),
                                            out / "val_store", ExtractConfig(**common, data={**data,
                                                                                             "split": "validation"}),
                                            max_contexts=args.val_contexts, model_path=desc, place=place,
                                            progress=place.main))
        if val_store.n_contexts < args.val_contexts:
            raise UsageError(f"--dataset {args.dataset}: the validation split gives {val_store.n_contexts} contexts, "
                             f"fewer than --val-contexts {args.val_contexts}")
        del model
    cells = store_cells(store, args.layers, args.heads, args.site, shared_heads=args.shared_heads)
    if place.distributed and args.parallel == "cells":
        distributed.log(place, f"training cells {[c.id for c in cells[place.rank::place.world_size]]} on "
                               f"{resolve_device(args.device)}")
    elif place.distributed:
        distributed.log(place, f"training all {len(cells)} cells on rows {place.rank}/{place.world_size} of each "
                               f"batch, on {resolve_device(args.device)}")
    index = train_cells(store, cells, out, t, val_store=val_store, resume=args.resume == "latest",
                        release=out.name, place=place, progress=place.main, parallel=args.parallel or "cells",
                        device=resolve_device(args.device))
    if not place.main:
        return 0
    print(json.dumps({"out": str(out / "cells"), "cells": index["cells"]}, indent=2))
    print(f"load one with: SAE.load_from_disk({str(out / 'cells' / cells[0].id)!r}); all as a release: "
          f"register_local_release(name, {str(out / 'cells')!r})")
    return 0


def _check_val_store(store, val_store, args) -> None:
    """``--val-store`` holds the same cells of the same model and another split of the same data as ``--store``."""
    a, b = store.config, val_store.config
    if val_store.model["weights_sha256"] != store.model["weights_sha256"]:
        raise UsageError(f"--val-store {args.val_store}: extracted from another model than --store {args.store}")
    same = ("site", "write_mode", "positions", "skip_first", "seed")
    diff = [k for k in same if a.get(k) != b.get(k)]
    data_a, data_b = a.get("data", {}), b.get("data", {})
    diff += [f"data.{k}" for k in ("dataset", "text_column", "context_length", "splits", "documents", "data_seed")
             if data_a.get(k) != data_b.get(k)]
    if diff:
        raise UsageError(f"--val-store {args.val_store}: extracted with other settings than --store ({', '.join(diff)})")
    if data_a.get("split") is not None and data_a.get("split") == data_b.get("split"):
        raise UsageError(f"--val-store {args.val_store}: holds the {data_b['split']} split, the one --store trains on; "
                         "extract it with --split validation")
    val_store.check_cell(args.layer, None if args.head is None else [args.head], args.site, args.write_mode)
    if val_store.n_contexts < args.val_contexts:
        raise UsageError(f"--val-store {args.val_store}: {val_store.n_contexts} contexts, fewer than --val-contexts "
                         f"{args.val_contexts}")


def _fit(args, layout, ckpt, provider, val_batches, dims: dict, model_name: str, context_length) -> int:
    from .checkpoints import CheckpointError, OutputDirError
    from .sae import WriteSAETrainingConfig
    from .train import train_write_sae

    cfg = WriteSAETrainingConfig(
        d_in=dims["d_k"] * dims["d_v"], d_sae=args.d_sae, d_k=dims["d_k"], d_v=dims["d_v"], k=args.k,
        encoder=args.encoder, decoder_rank=None if args.decoder_rank == 0 else args.decoder_rank,
        activation=args.activation, site=args.site, head=args.head, n_heads=dims["n_heads"], family=dims["family"],
        layer=args.layer, hook_name_hf=dims["hf_module"],
        write_mode=args.write_mode, input_layout=layout, aux_k=min(args.aux_k, args.d_sae),
        resample_every=args.resample_every)
    cfg.metadata.hook_name = dims["hook"]
    cfg.metadata.model_name = model_name
    cfg.metadata.context_size = context_length
    cfg.metadata.prepend_bos = False
    import torch

    torch.manual_seed(args.seed)  # the SAE's initialisation depends on the seed only (not on how data was loaded)
    try:
        sae, history = train_write_sae(cfg, provider, args.out, total_samples=args.total_samples,
                                       batch_size=args.batch_size, lr=args.lr, val_batches=val_batches,
                                       val_every=args.val_every, dead_feature_window=args.dead_feature_window,
                                       resume_from=ckpt, device=resolve_device(args.device))
    except (CheckpointError, OutputDirError) as e:  # another model or data than the checkpoint's; a failed write
        _err(f"writesae train: {e}")
        return 2
    last = history[-1] if history else {}
    print(json.dumps({"out": str(args.out), "final_validation": last}, indent=2))
    print(f"load with: SAE.load_from_disk({str(Path(args.out) / 'final')!r})")
    return 0


def _int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 0 for v in values) or len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"expected distinct non-negative integers, got {text!r}")
    return values


def _heads_list(text: str) -> list[int] | None:
    return None if text == "all" else _int_list(text)


def cmd_extract(args) -> int:
    from .store import ExtractConfig, StoreError, extract

    device = resolve_device(args.device)
    model, desc = _load(args.model, device)
    if model.tokenizer is None:
        raise UsageError(f"{desc} has no tokenizer; a text dataset needs one")
    cfg_m = model.cfg
    layers = cfg_m.recurrent_layers if args.layers is None else args.layers
    bad = [layer for layer in layers if layer not in cfg_m.recurrent_layers]
    if bad:
        raise UsageError(f"--layers {bad} are not recurrent layers; choose from {list(cfg_m.recurrent_layers)}")
    if args.heads is not None and any(h >= cfg_m.n_heads for h in args.heads):
        raise UsageError(f"--heads {args.heads} out of range (0..{cfg_m.n_heads - 1} or all)")
    contexts = _split_stream(model, args, args.split)
    cfg = ExtractConfig(layers=list(layers), heads=args.heads, site=args.site, write_mode=args.write_mode,
                        positions=args.positions, seed=args.seed, dtype=args.dtype,
                        contexts_per_shard=args.contexts_per_shard, forward_batch=args.forward_batch,
                        data={"dataset": str(args.dataset), "text_column": args.text_column,
                              "context_length": args.context_length, "split": args.split,
                              "splits": list(args.splits), "documents": args.documents,
                              "data_seed": args.data_seed})
    from . import distributed

    place = distributed.init(device)
    if place.distributed:
        distributed.log(place, f"extracting shards i with i mod {place.world_size} = {place.rank} on {device}")
    try:
        out = extract(model, contexts, args.out, cfg, max_contexts=args.contexts, model_path=desc, place=place)
    except StoreError as e:  # --out holds another model's or another configuration's store
        raise UsageError(str(e)) from None
    finally:
        distributed.finish(place)
    if not place.main:
        return 0
    manifest = json.loads((out / "manifest.json").read_text())
    n = sum(s["n_samples"] for s in manifest["shards"])
    size = sum(s["bytes"] for s in manifest["shards"])
    print(json.dumps({"store": str(out), "contexts": manifest["n_contexts"], "shards": len(manifest["shards"]),
                      "samples_per_cell": n, "cells": [f"L{layer}.H{h}" for layer in cfg.layers
                                                      for h in manifest["heads"]], "bytes": size}, indent=2))
    if manifest["n_contexts"] < args.contexts:
        _err(f"writesae extract: the dataset gave {manifest['n_contexts']} of the {args.contexts} contexts asked for")
    return 0


def _load_sae(spec: str):
    """``DIR`` (SAE.load_from_disk) or ``RELEASE:SAE_ID`` (SAE.from_pretrained, offline releases); the spec
    was checked by :func:`sae_cfg` before."""
    from sae_lens import SAE

    from .registry import load_release_sae

    if Path(spec).expanduser().is_dir():
        return SAE.load_from_disk(str(Path(spec).expanduser()))
    if ":" in spec:
        release, sae_id = spec.split(":", 1)
        return load_release_sae(release, sae_id)
    raise UsageError(f"--sae must be an SAE directory or RELEASE:SAE_ID, got {spec!r}")


def _documents(args) -> list[str]:
    """The documents of ``--dataset`` (rows; .txt by ``--documents``)."""
    from .data import load_text_dataset

    try:
        ds = load_text_dataset(args.dataset, text_column=args.text_column, documents=args.documents)
    except (ConnectionError, OSError) as e:
        if Path(args.dataset).expanduser().exists():
            raise
        raise UsageError(f"--dataset {args.dataset}: no such file or directory, and loading it as a Hugging Face "
                         f"Hub dataset failed ({type(e).__name__}: {str(e)[:200]}); offline, give a local "
                         ".txt/.jsonl/.parquet file or directory") from None
    return list(ds[args.text_column])


def _split_stream(model, args, split: str, texts: list[str] | None = None):
    """The shuffled token contexts of one document split of ``--dataset`` (``--splits``, ``--data-seed``)."""
    from .data import split_contexts

    if model.tokenizer is None:
        raise UsageError("the model has no tokenizer; a text dataset needs one")
    texts = _documents(args) if texts is None else texts
    return split_contexts(texts, model.tokenizer, args.context_length, split, fractions=args.splits,
                          seed=args.data_seed)


def _contexts(model, args):
    """``--contexts`` token contexts of ``--split`` (default: test) after the first ``--offset``."""
    import itertools

    import torch

    ctx = list(itertools.islice(_split_stream(model, args, args.split), args.offset, args.offset + args.contexts))
    if not ctx:
        raise UsageError(f"--dataset {args.dataset}: the {args.split} split yields no context of {args.context_length} "
                         f"tokens after --offset {args.offset} (lower --context-length or --offset, give more text, or "
                         "choose another --split / --splits)")
    return torch.stack(ctx)


def _experiment_inputs(args, with_sae: bool = True):
    """(hooked model, its description, the SAE or None, token contexts) from the common arguments; the SAE is
    checked against the model before the contexts are made."""
    model, desc = _load(args.model)
    sae = None
    if with_sae:
        sae = _load_sae(args.sae)
        check_sae_fit(model, sae, args.sae, per_head=True)
    return model, desc, sae, _contexts(model, args)


def cmd_substitute(args) -> int:
    import json

    from .experiments.substitution import SubstitutionConfig, run_substitution, save_substitution
    from .report import fmt_rate

    model, desc, sae, tokens = _experiment_inputs(args)
    cfg = SubstitutionConfig(atoms=args.atoms, max_per_atom=args.max_per_atom, max_per_context=args.max_per_context,
                             max_firings=args.max_firings, write_mode=args.write_mode or sae.cfg.write_mode,
                             seed=args.seed)
    result = run_substitution(model, sae, tokens, cfg)
    index = save_substitution(result, args.out, {"model": desc, "sae": args.sae, "n_contexts": len(tokens)})
    by = result.summary["by_metric"]["kl_final"]
    print(f"substitution: {result.summary['n_firings']} firings on {len(tokens)} contexts of {tokens.shape[1]} tokens")
    for cond in cfg.conditions:
        if cond in by:
            print(f"  win vs delete  {cond:16s} {fmt_rate(by[cond]['win'])}")
    print(f"  {_per_atom_line(by.get('atom_act', {}).get('per_atom_mean'))}")
    print(f"  paper (Qwen3.5-0.8B L9 H4): atom_act 92.4% of 4,851 firings\nreport: {index}")
    return 0


def cmd_closed_form(args) -> int:
    from .experiments.closed_form import ClosedFormConfig, run_closed_form, save_closed_form

    model, desc, sae, tokens = _experiment_inputs(args)
    cfg = ClosedFormConfig(atoms=args.atoms, t0=args.t0, eps=tuple(args.eps), n_tokens=args.n_tokens,
                           fit_fraction=args.fit_fraction, seed=args.seed)
    res = run_closed_form(model, sae, tokens, cfg)
    index = save_closed_form(res, args.out, {"model": desc, "sae": args.sae})
    print(f"closed form on {len(tokens)} contexts, atoms {args.atoms} ({res.summary.get('n_eval')} eval records):")
    for name, v in res.summary.get("pooled", {}).items():
        print(f"  {name:9s} R2 = {v['r2']:7.3f}   sign agreement {v['sign_agreement']:.3f}   n = {v['n']}")
    print(f"  paper: fitted G R2 = 0.98 (per prompt, feature, token); parameter-free R2 = -0.06\nreport: {index}")
    return 0


def cmd_install(args) -> int:
    from .experiments.install import InstallConfig, run_install, save_install, significance
    from .report import fmt_rate

    model, desc = _load(args.model)
    check_layer_head(model, args.layer, args.head)
    tokens = _contexts(model, args)
    strata = tuple(args.strata)
    cfg = InstallConfig(layer=args.layer, head=args.head, strata=strata, targets_per_stratum=args.targets,
                        multipliers=tuple(args.m), n_positions=args.n_positions, mode=args.mode,
                        max_new_tokens=args.new_tokens, seed=args.seed)
    res = run_install(model, tokens, cfg)
    index = save_install(res, args.out, {"model": desc})
    for m, block in res.summary["by_multiplier"].items():
        for key, v in block.items():
            print(f"  m={m} {key:14s} installed {fmt_rate(v['installed_rate'])}  baseline {fmt_rate(v['baseline_rate'])}"
                  f"  log-prob lift {v['mean_logprob_lift']:+.3f}  ({significance(v)})")
    print(f"  paper: ranks 100-1000, 33.3% -> 100% (about 60 independent pairs)\nreport: {index}")
    return 0


def cmd_attribute(args) -> int:
    import numpy as np
    import torch

    from .experiments.write_attribution import ErasureConfig, layer_effective_attention, run_erasure
    from .report import plt, write_report

    model, desc, sae, tokens = _experiment_inputs(args)
    er = run_erasure(model, sae, tokens, ErasureConfig(atoms=args.atoms, max_per_atom=args.max_per_atom,
                                                         seed=args.seed))
    A = layer_effective_attention(model, tokens[:1], sae.cfg.layer)[0][0, sae.cfg.head]  # per write family

    def heatmap():
        fig, ax = plt.subplots(figsize=(5, 4.5))
        im = ax.imshow(np.log10(A.abs().clamp(min=1e-12).numpy()), cmap="viridis", vmin=-6)
        ax.set_xlabel("write s")
        ax.set_ylabel("read t")
        ax.set_title(f"log10 |A_eff| (layer {sae.cfg.layer}, head {sae.cfg.head}, context 0)")
        fig.colorbar(im)
        return fig

    s = er["summary"]
    index = write_report(args.out, "WriteSAE write attribution and erasure",
                         {"experiment": "attribute", "model": desc, "sae": args.sae, "erasure": s},
                         er["records"], {"effective_attention": heatmap},
                         [f"Erasure of atoms {args.atoms}: {s.get('n', 0)} firing/control pairs."])
    if s.get("n"):
        print(f"erasure: mean d log p(preferred token) at firings {s['mean_delta_firing']:+.4f} vs controls "
              f"{s['mean_delta_control']:+.4f} (n = {s['n']}, Wilcoxon p = {s['wilcoxon_firing_vs_control']['p']:.3g})")
    else:
        print("erasure: the chosen atoms never fired on these contexts")
    print(f"report: {index}")
    return 0


def _validate_dashboard(args) -> None:
    _validate_data(args)
    cfg = sae_cfg(args.sae)
    check_atoms(args.atoms, cfg, args.sae)
    if cfg is not None and "head" in cfg:
        if cfg["head"] is None and args.head is None:
            raise UsageError(f"--sae {args.sae} is shared by all value heads: choose the head to view with --head")
        if cfg["head"] is not None and args.head is not None and args.head != cfg["head"]:
            raise UsageError(f"--head {args.head}: --sae {args.sae} is for value head {cfg['head']}")
    if args.neuronpedia is not None:
        check_out_dir(args.neuronpedia, "--neuronpedia")
        if args.np_model_id is not None and ("/" in args.np_model_id or not args.np_model_id.strip()):
            raise UsageError(f"--np-model-id {args.np_model_id!r}: a Neuronpedia model id is a name without '/'")


def cmd_dashboard(args) -> int:
    import math
    import re

    from .dashboard import DashboardConfig, StatsConfig, compute_dashboard, write_dashboard

    if args.tokens is not None:
        args.contexts = math.ceil(args.tokens / args.context_length)
    model, desc = _load(args.model)
    sae = _load_sae(args.sae)
    check_sae_fit(model, sae, args.sae)
    check_layer_head(model, None, args.head)
    tokens = _contexts(model, args)
    cfg = DashboardConfig(stats=StatsConfig(top_k=args.top_k, reservoir=args.reservoir, horizon=args.horizon,
                                            seed=args.seed), head=args.head,
                          batch=args.batch, atoms=args.atoms, value_firings=args.value_firings,
                          effect_firings=args.effect_firings, max_pages=args.max_pages)
    data = compute_dashboard(model, sae, tokens, cfg)
    np_kw = None
    if args.neuronpedia is not None:
        model_id = args.np_model_id or re.sub(r"[^A-Za-z0-9._-]+", "-", Path(str(desc)).name).strip("-") or "model"
        np_kw = {"out_dir": args.neuronpedia, "model_id": model_id, "dataset": str(args.dataset),
                 "hook_name": model.hook_prefix(sae.cfg.layer) + f"hook_{sae.cfg.site}",
                 "model_layers": len(model.family.decoder_layers(model.hf_model))}
    index = write_dashboard(data, args.out, model.tokenizer, title=f"{args.sae}", neuronpedia=np_kw)
    fires = data.stats.fires
    print(f"dashboard: {int((fires > 0).sum())} of {len(fires)} atoms fired on {tokens.shape[0]} contexts of "
          f"{tokens.shape[1]} tokens ({int((fires == 0).sum())} dead); pages for {len(data.atoms)} atoms; "
          f"pass {data.timings['pass_s']:.1f} s, value sides {data.timings['value_side_s']:.1f} s, effects "
          f"{data.timings['effect_s']:.1f} s")
    if np_kw is not None:
        print(f"neuronpedia export: {args.neuronpedia}")
    print(f"dashboard: {index}")
    return 0


def cmd_make_demo_model(args) -> int:
    from .demo.build import ARCHS, make_demo_model
    from .demo.run import demo_model_dir

    recipe = ARCHS[args.arch](steps=args.steps, seed=args.seed)
    tokenizer_dir = args.tokenizer
    if tokenizer_dir is None and args.arch != "qwen3_5":
        tokenizer_dir = demo_model_dir(arch="qwen3_5")  # one vocabulary for every demo model
    rec = make_demo_model(args.out, recipe, tokenizer_dir=tokenizer_dir)
    print(f"demo model: {rec['n_parameters'] / 1e6:.2f} M parameters, {rec['train_tokens']} training tokens, "
          f"validation loss {rec['validation_loss_nats']:.3f} nats/token vs unigram {rec['unigram_baseline_nats']:.3f}"
          f" ({rec['seconds'] / 60:.1f} min) -> {args.out}")
    return 0


def cmd_make_demo_release(args) -> int:
    from .demo.release import make_demo_release

    meta = make_demo_release(args.model, args.out, layers=args.layers)
    for sid in meta["saes"]:
        print(f"  {sid}: FVU {meta['expected_fvu'][sid]:.3f}  L0 {meta['expected_l0'][sid]:.1f}  "
              f"dead {meta['dead_fraction'][sid]:.2f}")
    return 0


def cmd_demo(args) -> int:
    from .demo.run import QUICK, DemoSize, run_demo, run_demo_all, summary_table

    size = QUICK if args.quick else DemoSize()
    if args.dashboard_pages is not None:
        import dataclasses

        size = dataclasses.replace(size, dashboard_pages=args.dashboard_pages)
    if args.arch == "all":
        summary = run_demo_all(args.out, size)
    else:
        summary = run_demo(args.out, size, arch=args.arch)
    print(summary_table(summary))
    print(f"report: {args.out}/index.html")
    return 0


def _pairs_inputs(args, n_saes: int = 1):
    """(hooked model, SAEs, task pairs): the shipped demo model and release unless given."""
    from .circuits.run import DEFAULT_SAES
    from .circuits.tasks import copy_task, quote_task
    from .demo import corpus

    model, _ = _load(args.model)
    if model.tokenizer is None:
        raise UsageError("the model has no tokenizer; the prompt tasks need one")
    specs = args.sae or list(DEFAULT_SAES[:n_saes])
    saes = [_load_sae(s) for s in specs]
    for spec, sae in zip(specs, saes):
        check_sae_fit(model, sae, spec, per_head=True)
    check_layer_head(model, getattr(args, "layer", None), getattr(args, "head", None))
    if args.dataset:
        from .data import split_documents

        texts = split_documents(_documents(args), args.split, args.splits, args.data_seed)
    else:
        texts = corpus.texts(args.split)
    if args.task == "quote":
        pairs = quote_task(model.tokenizer, texts, args.n, args.length, seed=args.seed)
    else:
        pairs = copy_task(model.tokenizer, texts, args.n, args.length, args.source_pos, args.seed)
    return model, saes, pairs


def cmd_patch(args) -> int:
    from .circuits.run import run_patch

    model, saes, pairs = _pairs_inputs(args)
    res = run_patch(model, saes[0], pairs, args.out)
    c, x = res["clean"], res["corrupted"]
    print(f"{args.task} task, n = {len(pairs)}: clean {c['mean']:.3f} [{c['lo']:.3f}, {c['hi']:.3f}], corrupted "
          f"{x['mean']:.3f} [{x['lo']:.3f}, {x['hi']:.3f}]")
    for e in res["writes"]["top"][:5]:
        print(f"  write L{e['layer']} pos {e['pos']} head {e['head']}: normalised {e['normalized']:+.3f}, effect "
              f"{e['effect']['mean']:+.3f} [{e['effect']['lo']:+.3f}, {e['effect']['hi']:+.3f}]")
    print(f"report: {args.out}/index.html")
    return 0


def cmd_attribution_patch(args) -> int:
    from .circuits.run import run_attribution_patch

    model, saes, pairs = _pairs_inputs(args)
    res = run_attribution_patch(model, saes[0], pairs, args.out)
    for k, v in res.items():
        if isinstance(v, dict):
            print(f"  {k}: pearson {v.get('pearson', float('nan')):.3f}, spearman {v.get('spearman', float('nan')):.3f}"
                  f" (n = {v['n']} patches)")
    print(f"report: {args.out}/index.html")
    return 0


def cmd_path_patch(args) -> int:
    from .circuits.run import run_path_patch

    model, _, pairs = _pairs_inputs(args, n_saes=0)
    res = run_path_patch(model, pairs, args.out, args.layer, args.head)
    s = res["sender"]
    print(f"sender: write at layer {s['layer']} position {s['pos']} head {s['head']} (n = {len(pairs)} prompts)")
    for t, r in res["by_read_position"].items():
        print(f"  via read {t}: {r['path'] - r['base']:+.4f} (total {r['total'] - r['base']:+.4f})")
    print(f"report: {args.out}/index.html")
    return 0


def cmd_circuit(args) -> int:
    from .circuits.run import run_circuit

    model, saes, pairs = _pairs_inputs(args, n_saes=2)
    res = run_circuit(model, saes, pairs, args.out, args.node_threshold, args.edge_threshold, args.acdc_threshold,
                      max_nodes_per_sae=args.max_nodes)
    print(f"attribution circuit: {res['attribution']['n_nodes']} nodes, {res['attribution']['n_edges']} edges; "
          f"ACDC: {res['acdc']['n_nodes']} nodes, faithfulness {res['acdc']['metric']['faithfulness']:.3f}")
    print(f"graphs: {args.out}/circuit.json, {args.out}/circuit_acdc.json; report: {args.out}/index.html")
    return 0


def cmd_edit_atoms(args) -> int:
    from .circuits.run import run_edit

    model, saes, pairs = _pairs_inputs(args)
    res = run_edit(model, saes[0], pairs, args.out, args.atoms, args.controls)
    b, a, c = res["before"], res["after"], res["controls"]
    print(f"ablating atoms {res['atoms']}: behaviour {b['mean']:.3f} -> {a['mean']:.3f} (n = {b['n']}); "
          f"effect {res['effect']['mean']:+.3f} [{res['effect']['lo']:+.3f}, {res['effect']['hi']:+.3f}]; random "
          f"sets {c.get('mean', float('nan')):+.3f} (n = {c['n']}), p = {c.get('p_at_least_as_large', float('nan')):.3f}")
    print(f"report: {args.out}/index.html")
    return 0


#: `writesae dashboard --help`: which atoms get pages (the README says the same)
DASHBOARD_PAGES = (
    "Writes R/index.html (a row for every atom of the SAE: firings, density, max activation, promoted tokens, win "
    "rate, dead) and a page R/atoms/{i}.html for each chosen atom (linked from its row). Which atoms get pages: by "
    "default every atom that fires on the scanned contexts; --max-pages N: the N most frequently firing (ties: the "
    "lower index) plus any --atoms; --atoms I J ...: exactly those. For more pages, rerun with a larger --max-pages, "
    "name atoms with --atoms, or drop both; --tokens / --contexts scan more text (more atoms fire).")


def _add_pairs_args(p, sae_help: str):
    p.add_argument("--model", default=None, help=MODEL_HELP)
    p.add_argument("--sae", action="append", default=None, help=sae_help)
    p.add_argument("--dataset", default=None, help="text file/dir for the prompts (default: the stdlib corpus)")
    p.add_argument("--text-column", default="text", help="the dataset's text column")
    p.add_argument("--split", choices=SPLITS, default="test",
                   help="document split the prompts come from (of --dataset, or of the stdlib corpus)")
    _add_corpus_args(p)
    p.add_argument("--task", choices=["quote", "copy"], default="quote",
                   help="quote: ' vs \" opening a string, metric logit(') - logit(\"); copy: induction")
    p.add_argument("--n", type=positive_int, default=16, help="number of clean/corrupted prompt pairs")
    p.add_argument("--length", type=length_int, default=24, help="prompt length in tokens")
    p.add_argument("--source-pos", type=nonneg_int, default=8, help="copy task: the corrupted position")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--out", required=True, help="results directory")


def _add_corpus_args(p):
    """How a dataset becomes documents and splits (the same defaults in every command, so splits agree)."""
    p.add_argument("--splits", type=split_shares, default="90,5,5", metavar="TRAIN,VAL,TEST",
                   help="percentages of the documents in the train, validation and test splits, summing to 100 "
                        "(or fractions summing to 1); by a hash of each document's text, so a document is in one split "
                        "whatever the command")
    p.add_argument("--documents", choices=TXT_DOCUMENTS, default="auto",
                   help=".txt documents: paragraph (blank-line separated), file (one per file) or line; auto: one "
                        "per file in a directory, paragraphs in a single file (JSON lines / parquet: one per row)")
    p.add_argument("--data-seed", type=int, default=0,
                   help="seed of the document order and of the context shuffle (contexts are shuffled across "
                        "documents)")


def _add_data_args(p):
    p.add_argument("--dataset", required=True, help="hub dataset name, or a local .txt/.jsonl/.parquet file or dir")
    p.add_argument("--text-column", default="text", help="the dataset's text column")
    p.add_argument("--split", choices=SPLITS, default="test",
                   help="document split the contexts come from (train on train, validate on validation, report "
                        "on test)")
    p.add_argument("--offset", type=nonneg_int, default=0, help="skip this many contexts of the split first")
    p.add_argument("--contexts", type=positive_int, default=32, help="number of token contexts")
    p.add_argument("--context-length", type=length_int, default=128, help="tokens per context")
    _add_corpus_args(p)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="writesae", description=__doc__)
    parser.set_defaults(debug=False)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    p = sub.add_parser("hooks", help="hook a model, print its write hook inventory and run the exactness self-check")
    p.add_argument("--model", default=None, help=MODEL_HELP)
    p.add_argument("--length", type=length_int, default=150, help="tokens per sequence (not a multiple of 64)")
    p.add_argument("--batch", type=positive_int, default=2, help="sequences")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.set_defaults(func=cmd_hooks)

    t = sub.add_parser("train", help="train a WriteSAE on a layer/head's write or state site")
    t.add_argument("--model", default=None,
                   help=MODEL_HELP[:-1] + "; with --store: none, and given, the store must come from it)")
    t.add_argument("--layer", type=int, default=None, help="a recurrent layer index (one dictionary; or --layers)")
    t.add_argument("--head", type=_head, default=None, help="value head index, or 'all' (one shared dictionary)")
    t.add_argument("--layers", type=_int_list, default=None,
                   help="many cells: recurrent layers, e.g. 1,2,5; one dictionary per (layer, head), saved as "
                        "OUT/cells/L{l}.H{h}.{site}/ with a release index OUT/cells/release.json; the model runs "
                        "once per batch for all cells (with --dataset: extracted into OUT/store first)")
    t.add_argument("--heads", type=_heads_list, default=None, help="with --layers: value heads, e.g. 0,3, or all "
                                                                     "(default: all)")
    t.add_argument("--parallel", choices=["cells", "data"], default=None,
                   help="under torchrun (with --layers): cells, the (layer, head) cells dealt out over the ranks "
                        "(cell j to rank j mod N), each training its own; data, every rank training every cell on "
                        "its share of each batch, gradients all-reduced (DDP). The extraction is shared out too")
    t.add_argument("--shared-heads", action="store_true",
                   help="with --layers: one dictionary per layer shared by the heads, instead of one per head")
    t.add_argument("--site", choices=["state", "write"], default="state", help="which matrix to train on")
    t.add_argument("--dataset", default=None,
                   help="hub dataset name, or a local .txt/.jsonl/.parquet file or dir (or give --store); trains on "
                        "its train split and validates on its validation split (--splits)")
    t.add_argument("--store", default=None,
                   help="train from an activation store (`writesae extract`) instead of streaming --dataset; with "
                        "--model the store must come from that model")
    t.add_argument("--val-store", default=None,
                   help="with --store: validate on the first --val-contexts of this store (extracted with --split "
                        "validation from the same data and model); without it the first --val-contexts of --store "
                        "are held out for validation")
    t.add_argument("--text-column", default="text", help="the dataset's text column")
    t.add_argument("--out", required=True, help="output directory (final/ loads with SAE.load_from_disk)")
    t.add_argument("--d-sae", type=int, default=2048, help="atoms (paper: 2048)")
    t.add_argument("--k", type=int, default=32, help="active atoms per sample (paper: 32)")
    t.add_argument("--encoder", choices=["bilinear", "dense"], default="bilinear",
                   help="bilinear: a_i = u_i^T S w_i (rank-1 encoder atoms); dense: a full encoder matrix")
    t.add_argument("--decoder-rank", type=int, default=1, help="rank of each atom; 0 = dense decoder (FlatSAE)")
    t.add_argument("--activation", choices=["topk", "batchtopk", "jumprelu"], default="topk",
                   help="sparsity of the codes")
    t.add_argument("--write-mode", choices=["raw", "delta"], default="raw",
                   help="write site: raw (k beta v^T) or delta (the erase folded in; Gated DeltaNet only)")
    t.add_argument("--layout", choices=["auto", "dense", "factors"], default="auto",
                   help="auto: factors for the write site with a bilinear encoder")
    t.add_argument("--positions", type=_positions, default="all", help="all, last, stride:N or random:N")
    t.add_argument("--context-length", type=int, default=128, help="tokens per context")
    t.add_argument("--total-samples", type=int, default=256 * 2000,
                   help="training samples (matrices), exactly: when not a multiple of --batch-size the last batch is "
                        "partial (per cell with --layers)")
    t.add_argument("--batch-size", type=int, default=256, help="samples per step")
    t.add_argument("--lr", type=float, default=3e-4, help="peak learning rate (warm-up, cosine decay to lr/10)")
    t.add_argument("--aux-k", type=int, default=256, help="dead atoms in the auxiliary TopK loss (0: no aux loss)")
    t.add_argument("--resample-every", type=int, default=RESAMPLE_EVERY,
                   help="resample dead atoms every N steps (0: off)")
    t.add_argument("--device", default="auto",
                   help="where the model forward and the SAE training run: auto (cuda:LOCAL_RANK when CUDA is "
                        "available, else cpu), cpu, cuda (cuda:LOCAL_RANK) or cuda:N; saved SAEs load on a CPU")
    t.add_argument("--dead-feature-window", type=int, default=100,
                   help="steps without firing after which an atom counts as dead (aux-k loss, resampling)")
    t.add_argument("--val-contexts", type=int, default=16, help="validation contexts (of the validation split)")
    t.add_argument("--val-every", type=int, default=100,
                   help="validate every N steps and after the last; the progress bar shows the running training FVU "
                        "and L0 and the last validation's val_fvu and dead_fraction (atoms that never fired on the "
                        "validation contexts, as OUT/validation.jsonl records it)")
    t.add_argument("--no-normalize", action="store_true", help="do not rescale inputs to mean norm sqrt(d_in)")
    t.add_argument("--resume", default=None,
                   help="a checkpoint directory to resume from, or 'latest' (the newest complete one under "
                        "OUT/checkpoints); the run continues its data stream where the checkpoint left it")
    t.add_argument("--seed", type=int, default=0, help="seed of the SAE's initialisation, the sample shuffle and "
                                                         "random:N positions")
    _add_corpus_args(t)
    t.set_defaults(func=cmd_train)

    x = sub.add_parser("extract", help="extract a write or state site of many layers and heads into an activation "
                                       "store (resumable shards + manifest) for `writesae train --store`")
    x.add_argument("--model", default=None, help=MODEL_HELP)
    x.add_argument("--dataset", required=True, help="hub dataset name, or a local .txt/.jsonl/.parquet file or dir")
    x.add_argument("--text-column", default="text", help="the dataset's text column")
    x.add_argument("--split", choices=SPLITS, default="train",
                   help="document split to extract (validation: a store for `train --val-store`)")
    x.add_argument("--layers", type=_int_list, default=None, help="recurrent layers, e.g. 1,2,5 (default: all)")
    x.add_argument("--heads", type=_heads_list, default=None, help="value heads, e.g. 0,3, or all (default: all)")
    x.add_argument("--site", choices=["write", "state"], default="write",
                   help="write: the factors (k, v), never k v^T; state: the state at the chosen positions")
    x.add_argument("--write-mode", choices=["raw", "delta"], default="raw",
                   help="write site: raw (k beta v^T) or delta (Gated DeltaNet only)")
    x.add_argument("--positions", type=_positions, default="all", help="all, last, stride:N or random:N")
    x.add_argument("--context-length", type=length_int, default=128, help="tokens per context")
    x.add_argument("--contexts", type=positive_int, default=256, help="token contexts to extract (at most)")
    x.add_argument("--contexts-per-shard", type=positive_int, default=64, help="contexts per shard file")
    x.add_argument("--forward-batch", type=positive_int, default=8, help="contexts per model forward")
    x.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32", help="stored dtype")
    x.add_argument("--seed", type=int, default=0, help="seed of random:N positions")
    x.add_argument("--device", default="auto",
                   help="where the model runs: auto (cuda:LOCAL_RANK under torchrun when CUDA is available, else "
                        "cpu), cpu, cuda or cuda:N")
    x.add_argument("--out", required=True, help="store directory (rerun the same command to resume)")
    _add_corpus_args(x)
    x.set_defaults(func=cmd_extract)

    s = sub.add_parser("substitute", help="substitution test: replace writes by atoms vs deleting them")
    s.add_argument("--model", default=None, help=MODEL_HELP)
    s.add_argument("--sae", required=True, help="SAE directory or RELEASE:SAE_ID (a per-head WriteSAE)")
    _add_data_args(s)
    s.add_argument("--out", required=True, help="results directory")
    s.add_argument("--atoms", type=nonneg_int, nargs="*", default=None, help="atom pool (default: all)")
    s.add_argument("--max-per-atom", type=positive_int, default=50, help="firings per atom at most")
    s.add_argument("--max-per-context", type=positive_int, default=4, help="firings per context at most")
    s.add_argument("--max-firings", type=positive_int, default=500, help="firings in all at most")
    s.add_argument("--write-mode", choices=["raw", "delta"], default=None, help="default: the SAE's")
    s.add_argument("--seed", type=int, default=0, help="random seed")
    s.set_defaults(func=cmd_substitute)

    c = sub.add_parser("closed-form", help="closed-form logit shift: JVP, direct path and fitted-G predictors")
    c.add_argument("--model", default=None, help=MODEL_HELP)
    c.add_argument("--sae", required=True, help="SAE directory or RELEASE:SAE_ID (a per-head WriteSAE)")
    _add_data_args(c)
    c.add_argument("--out", required=True, help="results directory")
    c.add_argument("--atoms", type=nonneg_int, nargs="+", default=[0], help="atoms to perturb along")
    c.add_argument("--t0", type=nonneg_int, default=None, help="perturbed position (default T // 4)")
    c.add_argument("--eps", type=positive_float, nargs="+", default=[0.05, 0.25, 1.0], help="x native write norm")
    c.add_argument("--n-tokens", type=positive_int, default=5, help="target tokens per atom")
    c.add_argument("--fit-fraction", type=open_fraction, default=0.5, help="share of records that fit G")
    c.add_argument("--seed", type=int, default=0, help="random seed")
    c.set_defaults(func=cmd_closed_form)

    i = sub.add_parser("install", help="behavioural install: steer greedy continuations towards target tokens")
    i.add_argument("--model", default=None, help=MODEL_HELP)
    _add_data_args(i)
    i.add_argument("--out", required=True, help="results directory")
    i.add_argument("--layer", type=nonneg_int, required=True, help="a recurrent layer index")
    i.add_argument("--head", type=nonneg_int, required=True, help="a value head index")
    i.add_argument("--strata", type=rank_range, nargs="+", default=[(10, 50), (50, 200)],
                   help="initial-rank ranges LO-HI")
    i.add_argument("--targets", type=positive_int, default=2, help="targets per stratum and prompt")
    i.add_argument("--m", type=positive_float, nargs="+", default=[3.0], help="install size(s) x native write norm")
    i.add_argument("--n-positions", type=positive_int, default=3, help="install positions per prompt")
    i.add_argument("--mode", choices=["replace", "add"], default="replace", help="replace or add to the write")
    i.add_argument("--new-tokens", type=positive_int, default=20, help="greedy continuation length")
    i.add_argument("--seed", type=int, default=0, help="random seed")
    i.set_defaults(func=cmd_install)

    a = sub.add_parser("attribute", help="write attribution (effective attention) and atom erasure")
    a.add_argument("--model", default=None, help=MODEL_HELP)
    a.add_argument("--sae", required=True, help="SAE directory or RELEASE:SAE_ID (a per-head WriteSAE)")
    _add_data_args(a)
    a.add_argument("--out", required=True, help="results directory")
    a.add_argument("--atoms", type=nonneg_int, nargs="+", default=[0], help="atoms to erase")
    a.add_argument("--max-per-atom", type=positive_int, default=20, help="firings per atom at most")
    a.add_argument("--seed", type=int, default=0, help="random seed")
    a.set_defaults(func=cmd_attribute)

    db = sub.add_parser("dashboard", help="atom dashboards: a static site (index + one page per atom) from one "
                                          "streaming pass; optional Neuronpedia export",
                        description=DASHBOARD_PAGES)
    db.add_argument("--model", default=None, help=MODEL_HELP)
    db.add_argument("--sae", required=True, help="SAE directory or RELEASE:SAE_ID (a per-head WriteSAE)")
    _add_data_args(db)
    db.add_argument("--out", required=True, help="site directory (index.html, atoms/, figures/, data/)")
    db.add_argument("--tokens", type=positive_int, default=None,
                    help="tokens of data to scan (sets --contexts to ceil(N / --context-length))")
    db.add_argument("--atoms", type=nonneg_int, nargs="+", default=None,
                    help="atoms that get pages, value sides and measured effects (default: every atom that fires; "
                         "with --max-pages: added to its most frequent atoms)")
    db.add_argument("--max-pages", type=positive_int, default=None,
                    help="pages for the N most frequently firing atoms (ties: the lower index), plus any --atoms "
                         "(default: every atom that fires)")
    db.add_argument("--head", type=nonneg_int, default=None,
                    help="the value head to view a head-shared SAE (--shared-heads) at")
    db.add_argument("--batch", type=positive_int, default=8, help="contexts per forward of the pass")
    db.add_argument("--top-k", type=positive_int, default=20, help="top activations kept per atom")
    db.add_argument("--reservoir", type=positive_int, default=200,
                    help="firings sampled uniformly per atom (quantile samples and quantiles)")
    db.add_argument("--horizon", type=nonneg_int, default=32, help="positions of the decay / persistence curves")
    db.add_argument("--value-firings", type=nonneg_int, default=4, help="top firings per atom for the value side")
    db.add_argument("--effect-firings", type=nonneg_int, default=3,
                    help="top firings per atom where the atom is substituted (measured effect, win rate)")
    db.add_argument("--neuronpedia", default=None, help="also write Neuronpedia's upload format here")
    db.add_argument("--np-model-id", default=None, help="Neuronpedia model id (default: the model's directory name)")
    db.add_argument("--seed", type=int, default=0, help="seed of the reservoir samples")
    db.set_defaults(func=cmd_dashboard)

    mk = sub.add_parser("make-demo-model", help="train the shipped demo model on the Python stdlib (reproducible)")
    mk.add_argument("--out", required=True, help="model directory to write")
    mk.add_argument("--arch", choices=["qwen3_5", "mamba2"], default="qwen3_5",
                    help="qwen3_5: the Gated DeltaNet demo; mamba2: the Mamba-2 demo")
    mk.add_argument("--tokenizer", default=None,
                    help="reuse this tokenizer directory (default for mamba2: the shipped GDN demo's tokenizer)")
    mk.add_argument("--steps", type=positive_int, default=900, help="training steps")
    mk.add_argument("--seed", type=int, default=0, help="random seed")
    mk.set_defaults(func=cmd_make_demo_model)

    mr = sub.add_parser("make-demo-release", help="train the shipped WriteSAE release for the demo model")
    mr.add_argument("--model", required=True, help="the demo model directory")
    mr.add_argument("--out", required=True, help="release directory to write")
    mr.add_argument("--layers", type=_int_list, default=None,
                    help="train only these recurrent layers (comma-separated) and merge them into the release in --out")
    mr.set_defaults(func=cmd_make_demo_release)

    pp = sub.add_parser("patch", help="activation patching of every write and of WriteSAE atoms")
    _add_pairs_args(pp, "DIR or RELEASE:SAE_ID (default writesae-demo:L4.H0.write)")
    pp.set_defaults(func=cmd_patch)
    ap = sub.add_parser("attribution-patch", help="attribution patching vs actual patching (writes, atoms)")
    _add_pairs_args(ap, "DIR or RELEASE:SAE_ID (default writesae-demo:L4.H0.write)")
    ap.set_defaults(func=cmd_attribution_patch)
    pa = sub.add_parser("path-patch", help="path patching of one write through chosen reads / later layers")
    _add_pairs_args(pa, "unused")
    pa.add_argument("--layer", type=nonneg_int, default=None, help="sender layer (default: largest patching effect)")
    pa.add_argument("--head", type=nonneg_int, default=None, help="sender head (with --layer)")
    pa.set_defaults(func=cmd_path_patch)
    ci = sub.add_parser("circuit", help="sparse feature circuit over write atoms + ACDC pruning (JSON, figures)")
    _add_pairs_args(ci, "repeatable; in upstream-to-downstream order (default: the demo write and state SAEs)")
    ci.add_argument("--node-threshold", type=nonneg_float, default=0.02, help="x |clean - corrupted| metric")
    ci.add_argument("--edge-threshold", type=nonneg_float, default=0.01, help="x |clean - corrupted| metric")
    ci.add_argument("--acdc-threshold", type=nonneg_float, default=0.02, help="x |clean - corrupted| metric")
    ci.add_argument("--max-nodes", type=positive_int, default=10, help="atoms kept per SAE at most (by |effect|)")
    ci.set_defaults(func=cmd_circuit)
    ea = sub.add_parser("edit-atoms", help="SHIFT-style ablation of atoms vs random-atom controls")
    _add_pairs_args(ea, "DIR or RELEASE:SAE_ID (default writesae-demo:L4.H0.write)")
    ea.add_argument("--atoms", type=nonneg_int, nargs="+", default=None, help="default: the top-3 by attribution")
    ea.add_argument("--controls", type=nonneg_int, default=20, help="random atom sets to compare with")
    ea.set_defaults(func=cmd_edit_atoms)

    d = sub.add_parser("demo", help="the shipped model and SAEs through the substitution, closed-form and install "
                                    "tests on held-out text (the main job)")
    d.add_argument("--out", default="writesae_results/demo", help="results directory")
    d.add_argument("--arch", choices=["all", "qwen3_5", "mamba2"], default="all",
                   help="all (default): both shipped models and the cross-architecture comparison; or just one")
    d.add_argument("--quick", action="store_true", help="a reduced size (for tests)")
    d.add_argument("--dashboard-pages", type=positive_int, default=None,
                   help="atom pages per SAE dashboard: the N most frequently firing atoms on the held-out contexts, "
                        "plus the README's example atoms (default: 24; 2 with --quick); every atom has a row in the "
                        "dashboard's index either way")
    d.set_defaults(func=cmd_demo)
    return parser


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every default in --help, except the None of an option whose help says what its absence means."""

    def _get_help_string(self, action):
        if action.required or action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """One-line usage errors (``writesae <command>: <message>``, exit status 2); ``--debug`` everywhere."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)
        self.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                          help="show tracebacks instead of one-line errors")

    def error(self, message: str):
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _one_line(text: str) -> str:
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip()) or "failed"


#: errors whose message is the explanation (user-facing library errors); others also name their type
_USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, PermissionError, NotImplementedError)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read when torch loads (module docstring)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # name the subcommand whose options these are not (argparse reports them on the root parser)
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        sub.choices[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
    prog = f"writesae {args.command}"
    debug = getattr(args, "debug", False)
    try:
        validator = VALIDATORS.get(args.command)
        if validator is not None:
            validator(args)
        with expected_warnings_silenced():
            return args.func(args)
    except UsageError as e:
        if debug:
            raise
        _err(f"{prog}: {_one_line(e)}")
        return 2
    except KeyboardInterrupt:
        if debug:
            raise
        _err(f"{prog}: interrupted")
        return 130
    except SystemExit as e:
        if debug or not isinstance(e.code, str):
            raise
        _err(f"{prog}: {_one_line(e.code).removeprefix('writesae: ')}")
        return 2
    except Exception as e:  # noqa: BLE001 - a one-line error; --debug shows the traceback
        if debug:
            raise
        if type(e).__name__ == "StoreError":  # a store that does not fit the command: a usage error
            _err(f"{prog}: {_one_line(e)}")
            return 2
        kind = "" if isinstance(e, _USER_ERRORS) or type(e).__name__.endswith(("Error", "Exception")) and \
            type(e).__module__.startswith("writesae_plugin") else f"{type(e).__name__}: "
        _err(f"{prog}: {kind}{_one_line(e)} (--debug shows the traceback)")
        return 1


if __name__ == "__main__":
    sys.exit(main())
