"""Activation store: a site of many (layer, head) cells extracted once, trained on many times.

Layout of a store directory::

    manifest.json                what was extracted and from what (model hash, tokenizer, data, site, cells,
                                 positions, dtype) and the complete shards, each with its context range,
                                 sample count, size and sha256
    shard-00000.safetensors      per stored layer ``L``: ``L{L}.key`` ``[N, h, d_k]`` and ``L{L}.value``
                                 ``[N, h, d_v]`` (write site: the factors, never ``k v^T``) or ``L{L}.state``
                                 ``[N, h, d_k, d_v]`` (state site, only at the chosen positions); ``context``
                                 ``[N]`` and ``pos`` ``[N]`` (where each sample is); ``tokens`` ``[C, T]``
                                 (the shard's contexts)

Why safetensors and not Arrow: every shard is a handful of dense tensors read whole, by cell, into the
trainer; safetensors maps them without copies or a schema, is what the SAEs themselves are saved in, and is
written atomically here (temp file + rename). Rows are in stream order (context, position, head), so a
:class:`StoreProvider` yields exactly the batches that streaming the same contexts through the model yields.

Extraction resumes: complete shards (listed in the manifest, size and hash checked) are kept; a shard file
that the manifest does not list, or one whose bytes disagree with it (torn), is extracted again.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes
from torch import Tensor

from .checkpoints import atomic_write_bytes, atomic_write_text
from .data import ActivationProvider, SiteSpec, check_spec, collect_sites, flatten_site, position_index

STORE_FORMAT = "writesae-store/1"
MANIFEST = "manifest.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class StoreError(ValueError):
    """A store that is missing, torn, or does not fit what it is used for."""


def weights_sha256(hf_model) -> str:
    """sha256 over every parameter and buffer (names, shapes, dtypes, bytes), in name order."""
    h = hashlib.sha256()
    tensors = dict(hf_model.named_parameters())
    tensors.update({n: b for n, b in hf_model.named_buffers() if b is not None})
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def model_info(model, path: str | None = None) -> dict:
    """What a store records about the model it came from."""
    cfg = model.cfg
    tok = model.tokenizer
    path = path or cfg.model_name
    if path and Path(path).expanduser().exists():  # a local directory: record where it is, not how it was typed
        path = str(Path(path).expanduser().resolve())
    return {"path": path, "family": cfg.family, "weights_sha256": weights_sha256(model.hf_model),
            "d_k": cfg.d_k, "d_v": cfg.d_v, "n_heads": cfg.n_heads, "recurrent_layers": list(cfg.recurrent_layers),
            "hook_prefixes": {str(layer): model.hook_prefix(layer) for layer in cfg.recurrent_layers},
            "hf_module_names": {str(layer): model.family.hf_module_name(model.hf_model, layer)
                                for layer in cfg.recurrent_layers},
            "tokenizer": None if tok is None else {"name_or_path": getattr(tok, "name_or_path", ""),
                                                   "vocab_size": len(tok)}}


@dataclass
class ExtractConfig:
    """What to extract: ``site`` of ``layers`` x ``heads`` at ``positions`` (see :class:`SiteSpec`)."""

    layers: list[int]
    heads: list[int] | None = None
    site: str = "write"
    write_mode: str = "raw"
    positions: str | tuple[str, int] = "all"
    skip_first: int = 0
    seed: int = 0
    dtype: str = "float32"
    contexts_per_shard: int = 64
    forward_batch: int = 8
    data: dict = field(default_factory=dict)  # the dataset, split and context length (recorded, compared)

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.contexts_per_shard < 1 or self.forward_batch < 1:
            raise ValueError("contexts_per_shard and forward_batch must be >= 1")
        if self.contexts_per_shard % self.forward_batch:
            raise ValueError(f"contexts_per_shard ({self.contexts_per_shard}) must be a multiple of forward_batch "
                             f"({self.forward_batch}), so a shard holds whole forward batches")
        SiteSpec(layer=self.layers, site=self.site, positions=self.positions, write_mode=self.write_mode)

    def spec(self) -> SiteSpec:
        return SiteSpec(layer=list(self.layers), site=self.site, heads=self.heads, positions=self.positions,
                        write_mode=self.write_mode, skip_first=self.skip_first)

    def identity(self) -> dict:
        return json.loads(json.dumps({
            "layers": list(self.layers), "heads": self.heads, "site": self.site, "write_mode": self.write_mode,
            "positions": self.positions, "skip_first": self.skip_first, "seed": self.seed, "dtype": self.dtype,
            "contexts_per_shard": self.contexts_per_shard, "forward_batch": self.forward_batch, "data": self.data}))


def _shard_name(i: int) -> str:
    return f"shard-{i:05d}.safetensors"


def _contexts_digest(tokens: Tensor) -> str:
    return hashlib.sha256(tokens.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


def extract(model, contexts: Iterable[Tensor], out: str | Path, cfg: ExtractConfig, *, max_contexts: int | None = None,
            model_path: str | None = None, progress: bool = True, place=None) -> Path:
    """Extract ``cfg``'s cells from ``contexts`` (token contexts ``[T]``, a deterministic stream) into ``out``.

    One forward per ``forward_batch`` contexts collects every layer and head. Each shard is written through a
    temporary file and renamed; the manifest lists complete shards. Rerunning on the same ``out`` with the same
    model, data and configuration continues after the last complete shard (the skipped contexts must be the
    stored ones: their tokens are compared); anything else is refused. ``max_contexts`` caps the contexts.

    ``place`` (``distributed.Place``, from torchrun): shard ``i`` is extracted by rank ``i mod world_size``, each
    rank recording its shards in ``rank-{r}.json``; rank 0 merges them into the manifest after a barrier. Every
    rank must be given the same ``contexts`` stream; the store equals a single process's, and a resume may use
    another number of ranks.

    Raises :class:`StoreError` for a store of another model or configuration.
    """
    from tqdm.auto import tqdm

    from .distributed import Place, barrier

    place = place or Place()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    layers, heads = check_spec(model, cfg.spec())
    info = model_info(model, model_path)
    ident = cfg.identity()
    manifest_path = out / MANIFEST
    if manifest_path.exists():
        manifest = read_manifest(out)
        if manifest["model"]["weights_sha256"] != info["weights_sha256"]:
            raise StoreError(f"{out} holds activations of another model ({manifest['model']['path']}); choose "
                             "another --out")
        if manifest["config"] != ident:
            diff = sorted(k for k in set(ident) | set(manifest["config"]) if ident.get(k) != manifest["config"].get(k))
            raise StoreError(f"{out} was extracted with other settings ({', '.join(diff)}); choose another --out")
    else:
        manifest = {"format": STORE_FORMAT, "model": info, "config": ident, "heads": heads, "shards": [],
                    "complete": False}
    # complete shards of an earlier run (any number of ranks), each checked; a torn or missing one is redone
    entries = {e["index"]: e for e in manifest["shards"]}
    for path in sorted(out.glob("rank-*.json")):
        entries.update({e["index"]: e for e in json.loads(path.read_text())["shards"]})
    manifest["shards"] = [e for _, e in sorted(entries.items()) if _shard_ok(out, e)]
    manifest["complete"] = False
    if place.main:
        for stale in out.glob(".tmp-*"):  # temporary files of a killed extraction
            stale.unlink()
        atomic_write_text(manifest_path, json.dumps(manifest, indent=1))
        for path in out.glob("rank-*.json"):  # merged into the manifest above
            path.unlink()
    barrier(place)
    mine: list[dict] = []  # this rank's new shards (distributed: its rank file)
    spec = cfg.spec()
    dtype = DTYPES[cfg.dtype]
    per = cfg.contexts_per_shard
    it = iter(contexts)
    total = None if max_contexts is None else max_contexts
    bar = tqdm(total=total, desc="extract", unit="ctx", disable=not progress or not place.main, dynamic_ncols=True)
    shard_i, n_ctx = 0, 0
    recorded = {s["index"]: s for s in manifest["shards"]}
    while total is None or n_ctx < total:
        want = per if total is None else min(per, total - n_ctx)
        batch = []
        for _ in range(want):
            try:
                batch.append(torch.as_tensor(next(it)))
            except StopIteration:
                break
        if not batch:
            break
        tokens = torch.stack(batch)
        first = n_ctx
        n_ctx += len(batch)
        if shard_i % place.world_size != place.rank:
            pass  # another rank's shard
        elif shard_i in recorded:
            if recorded[shard_i]["tokens_sha256"] != _contexts_digest(tokens):
                raise StoreError(f"{out}: shard {shard_i} holds other contexts than this data stream gives; resume "
                                 "with the same dataset, split and context length")
        else:
            tensors = {"tokens": tokens.to(torch.int32), "context": [], "pos": []}
            per_layer: dict[int, dict[str, list[Tensor]]] = {layer: {} for layer in layers}
            for j in range(0, len(batch), cfg.forward_batch):
                toks = tokens[j:j + cfg.forward_batch]
                pos = position_index(spec, toks.shape[0], toks.shape[1], first + j, cfg.seed)
                got = collect_sites(model, toks.to(model.cfg.device), layers, heads, cfg.site, pos, cfg.write_mode)
                b, P = pos.shape
                tensors["context"].append((first + j + torch.arange(b))[:, None].expand(b, P).reshape(-1))
                tensors["pos"].append(pos.reshape(-1))
                for layer in layers:
                    for key, x in got[layer].items():
                        per_layer[layer].setdefault(key, []).append(x.reshape(b * P, *x.shape[2:]).cpu())
            tensors["context"] = torch.cat(tensors["context"]).to(torch.int64)
            tensors["pos"] = torch.cat(tensors["pos"]).to(torch.int32)
            for layer in layers:
                for key, xs in per_layer[layer].items():
                    x = torch.cat(xs)
                    if not torch.isfinite(x).all():
                        raise StoreError(f"non-finite activations at layer {layer} in contexts {first}..{n_ctx - 1}")
                    tensors[f"L{layer}.{key}"] = x.to(dtype).contiguous()
            data = save_bytes(tensors, metadata={"format": STORE_FORMAT})  # one key: deterministic bytes
            atomic_write_bytes(out / _shard_name(shard_i), data)
            entry = {"index": shard_i, "file": _shard_name(shard_i), "first_context": first,
                     "n_contexts": len(batch), "n_samples": int(tensors["context"].shape[0]), "bytes": len(data),
                     "sha256": hashlib.sha256(data).hexdigest(), "tokens_sha256": _contexts_digest(tokens)}
            if place.distributed:
                mine.append(entry)
                atomic_write_text(out / f"rank-{place.rank}.json", json.dumps({"shards": mine}, indent=1))
            else:
                manifest["shards"].append(entry)
                atomic_write_text(manifest_path, json.dumps(manifest, indent=1))
        shard_i += 1
        bar.update(len(batch))
    bar.close()
    barrier(place)
    if place.main:
        entries = {e["index"]: e for e in manifest["shards"]}
        for path in sorted(out.glob("rank-*.json")):
            entries.update({e["index"]: e for e in json.loads(path.read_text())["shards"]})
        if sorted(entries) != list(range(shard_i)):
            missing = sorted(set(range(shard_i)) - set(entries))
            raise StoreError(f"{out}: shards {missing} were not written; run the extraction again to complete it")
        manifest["shards"] = [entries[i] for i in range(shard_i)]
        manifest["complete"] = True
        manifest["n_contexts"] = n_ctx
        atomic_write_text(manifest_path, json.dumps(manifest, indent=1))
        for path in out.glob("rank-*.json"):
            path.unlink()
    barrier(place)  # every rank returns a complete store
    return out


def _shard_ok(store: Path, entry: dict) -> bool:
    """The shard file of a manifest entry is present with its recorded size and hash."""
    path = store / entry["file"]
    return path.is_file() and path.stat().st_size == entry["bytes"] and \
        hashlib.sha256(path.read_bytes()).hexdigest() == entry["sha256"]


def read_manifest(store: str | Path) -> dict:
    """The manifest of a store, checked for its format (:class:`StoreError` otherwise)."""
    path = Path(store) / MANIFEST
    if not path.is_file():
        raise StoreError(f"{store} is not an activation store (no {MANIFEST}); make one with `writesae extract`")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise StoreError(f"{path} is not valid JSON ({e}); extract the store again") from None
    if manifest.get("format") != STORE_FORMAT:
        raise StoreError(f"{path}: unknown store format {manifest.get('format')!r} (expected {STORE_FORMAT})")
    return manifest


def verified_shards(store: str | Path, manifest: dict, hash_check: bool = True) -> list[dict]:
    """The manifest's shards up to the first one that is missing or whose bytes disagree with the manifest."""
    good = []
    for s in manifest["shards"]:
        path = Path(store) / s["file"]
        if not path.is_file() or path.stat().st_size != s["bytes"]:
            break
        if hash_check and hashlib.sha256(path.read_bytes()).hexdigest() != s["sha256"]:
            break
        good.append(s)
    return good


class ActivationStore:
    """A complete store opened for reading: its manifest and its shards, checked (size; hash when read)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        if not self.manifest.get("complete"):
            raise StoreError(f"{self.path} is incomplete (extraction stopped after {len(self.manifest['shards'])} "
                             "shard(s)); rerun the same `writesae extract` command to finish it")
        good = verified_shards(self.path, self.manifest, hash_check=False)
        if len(good) != len(self.manifest["shards"]):
            bad = self.manifest["shards"][len(good)]["file"]
            raise StoreError(f"{self.path}: shard {bad} is missing or torn; rerun `writesae extract` to redo it")

    @property
    def config(self) -> dict:
        return self.manifest["config"]

    @property
    def model(self) -> dict:
        return self.manifest["model"]

    @property
    def positions(self):
        """The stored positions as a :class:`SiteSpec` takes them (JSON turned the tuple into a list)."""
        p = self.config["positions"]
        return tuple(p) if isinstance(p, list) else p

    @property
    def heads(self) -> list[int]:
        return list(self.manifest["heads"])

    @property
    def n_contexts(self) -> int:
        return int(self.manifest["n_contexts"])

    def shard(self, i: int) -> dict[str, Tensor]:
        """The tensors of shard ``i`` (its bytes checked against the manifest's hash)."""
        entry = self.manifest["shards"][i]
        data = (self.path / entry["file"]).read_bytes()
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise StoreError(f"{self.path / entry['file']} does not match the manifest's hash (torn or changed); "
                             "rerun `writesae extract` to redo it")
        return load_bytes(data)

    def check_cell(self, layer: int, heads: list[int] | None, site: str, write_mode: str | None = None,
                   model_sha256: str | None = None, d_k: int | None = None, d_v: int | None = None) -> list[int]:
        """Raise :class:`StoreError` unless the store holds ``site`` of ``layer`` for ``heads`` (None: every
        head it holds) of this model; returns the heads' indices in the stored head axis."""
        cfg = self.config
        if site != cfg["site"]:
            raise StoreError(f"{self.path} holds the {cfg['site']} site, not {site}")
        if write_mode is not None and site == "write" and write_mode != cfg["write_mode"]:
            raise StoreError(f"{self.path} holds {cfg['write_mode']} writes, not {write_mode}")
        if layer not in cfg["layers"]:
            raise StoreError(f"{self.path} holds layers {cfg['layers']}, not layer {layer}")
        stored = self.heads
        wanted = stored if heads is None else list(heads)
        missing = [h for h in wanted if h not in stored]
        if missing:
            raise StoreError(f"{self.path} holds heads {stored}, not {missing}")
        if model_sha256 is not None and model_sha256 != self.model["weights_sha256"]:
            raise StoreError(f"{self.path} was extracted from another model ({self.model['path']}: weights "
                             f"sha256 {self.model['weights_sha256'][:12]}..., this one {model_sha256[:12]}...)")
        for name, want in (("d_k", d_k), ("d_v", d_v)):
            if want is not None and want != self.model[name]:
                raise StoreError(f"{self.path} holds {name} = {self.model[name]}, not {want}")
        return [stored.index(h) for h in wanted]

    def chunks(self, layer: int, heads: list[int] | None, layout: str, forward_batch: int,
               first_context: int = 0, end_context: int | None = None) -> Iterator[tuple[Tensor, Tensor]]:
        """``(samples, tokens)`` for contexts ``[c, c + forward_batch)``, ``c = first_context, first_context +
        forward_batch, ...`` up to ``end_context`` (default: all; ranges may span shards), in stream order: what a
        streaming provider computes per forward. Samples ``[N, d_in]`` (dense) or ``[N, d_k + d_v]`` (factors),
        fp32; tokens ``[b, T]``."""
        site = self.config["site"]
        idx = self.check_cell(layer, heads, site)
        keys = ("state",) if site == "state" else ("key", "value")
        end = self.n_contexts if end_context is None else min(end_context, self.n_contexts)
        shards = self.manifest["shards"]
        loaded: dict[int, dict[str, Tensor]] = {}
        for start in range(first_context, end, forward_batch):
            stop = min(start + forward_batch, end)
            parts: dict[str, list[Tensor]] = {k: [] for k in (*keys, "tokens")}
            for i, entry in enumerate(shards):
                lo, hi = entry["first_context"], entry["first_context"] + entry["n_contexts"]
                a, b = max(lo, start), min(hi, stop)
                if a >= b:
                    continue
                if i not in loaded:
                    loaded.clear()  # keep one shard in memory
                    loaded[i] = self.shard(i)
                t = loaded[i]
                rows = ((t["context"] >= a) & (t["context"] < b)).nonzero().squeeze(1)
                for k in keys:
                    parts[k].append(t[f"L{layer}.{k}"].index_select(0, rows).float()[:, idx])
                parts["tokens"].append(t["tokens"][a - lo:b - lo].to(torch.int64))
            got = {k: torch.cat(parts[k]) for k in keys}
            yield flatten_site(got, layout), torch.cat(parts["tokens"])


class StoreProvider(ActivationProvider):
    """An :class:`ActivationProvider` that reads one cell (``layer``, ``heads``) of an :class:`ActivationStore`
    instead of running the model: the same batches, shuffle, normalisation, ``state_dict`` and resume as
    streaming the store's contexts (same ``seed``, ``forward_batch`` and ``batch_size``; random positions are
    the store's, drawn with its extraction seed).

    ``first_context``: contexts before it are not used (e.g. a validation split at the start of the store);
    ``n_contexts``: use at most this many from there."""

    def __init__(self, store: ActivationStore, spec: SiteSpec, batch_size: int = 256, buffer_batches: int = 16,
                 forward_batch: int | None = None, seed: int = 0, device: str | torch.device = "cpu",
                 normalize: bool = False, first_context: int = 0, n_contexts: int | None = None,
                 drop_last: bool = True):
        if not isinstance(spec.layer, int):
            raise ValueError("a StoreProvider reads one layer; give SiteSpec(layer=L)")
        cfg = store.config
        if spec.positions != store.positions or spec.skip_first != cfg["skip_first"]:
            raise StoreError(f"{store.path} holds positions {cfg['positions']} (skip_first {cfg['skip_first']}), "
                             f"not {spec.positions} (skip_first {spec.skip_first})")
        store.check_cell(spec.layer, spec.heads, spec.site, spec.write_mode)
        self.store = store
        self.d_k, self.d_v = store.model["d_k"], store.model["d_v"]
        fb = cfg["forward_batch"] if forward_batch is None else forward_batch
        super().__init__(_NoModel(store.model), iter(()), spec, batch_size=batch_size,
                         buffer_batches=buffer_batches, forward_batch=fb, seed=seed, device=device,
                         normalize=normalize, first_context=first_context, position_seed=cfg["seed"],
                         drop_last=drop_last)
        end = store.n_contexts if n_contexts is None else min(store.n_contexts, first_context + n_contexts)
        self.end_context = end
        self._source = None
        shards = store.manifest["shards"]
        per_context = shards[0]["n_samples"] / shards[0]["n_contexts"] if shards else 0
        heads = len(store.heads) if spec.heads is None else len(spec.heads)
        #: training rows this provider can give (contexts first_context..end_context, every position and head)
        self.available = int(round((end - first_context) * per_context)) * heads

    def check_enough(self, total_samples: int) -> None:
        """Refuse, before any training, a run that asks for more samples than the store holds for it."""
        if total_samples > self.available:
            raise StoreError(f"{self.store.path} holds {self.available} samples for this cell after the validation "
                             f"contexts, fewer than --total-samples {total_samples}; lower --total-samples or "
                             f"extract more contexts (writesae extract --contexts)")

    def _chunks(self):
        return self.store.chunks(self.spec.layer, self.spec.heads, self.spec.layout, self.forward_batch,
                                 self.first_context + self.contexts_consumed, self.end_context)

    def _next_chunk(self) -> Tensor | None:
        if self._source is None:
            self._source = self._chunks()
        try:
            acts, tokens = next(self._source)
        except StopIteration:
            self.exhausted = True
            return None
        for ctx in tokens:  # the stream position and digest, as a streaming provider keeps them
            self.contexts_consumed += 1
            self._digest.update(ctx.numpy().tobytes())
        return acts.to(self.device)

    def _skip_contexts(self, n: int) -> None:
        """Skip the first ``n`` contexts from ``first_context`` (their stored tokens go into the digest)."""
        if self.first_context + n > self.end_context:
            raise ValueError(f"the saved stream consumed {n} contexts; this store has only "
                             f"{self.end_context - self.first_context}")
        for i, entry in enumerate(self.store.manifest["shards"]):
            lo, cnt = entry["first_context"], entry["n_contexts"]
            a, b = max(lo, self.first_context), min(lo + cnt, self.first_context + n)
            if a < b:
                for ctx in self.store.shard(i)["tokens"][a - lo:b - lo].to(torch.int64):
                    self._digest.update(ctx.numpy().tobytes())
        self.contexts_consumed = n


class _NoModel:
    """Stands in for the hooked model where a provider only reads its dimensions (store-backed training)."""

    def __init__(self, info: dict):
        from types import SimpleNamespace

        self.cfg = SimpleNamespace(d_k=info["d_k"], d_v=info["d_v"], n_heads=info["n_heads"],
                                   recurrent_layers=tuple(info["recurrent_layers"]), family=info["family"],
                                   device=torch.device("cpu"))
        self.hf_model = None


__all__ = ["extract", "ExtractConfig", "ActivationStore", "StoreProvider", "StoreError", "read_manifest",
           "weights_sha256", "model_info", "STORE_FORMAT"]
