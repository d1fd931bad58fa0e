"""Activation provider: stream a write or state site from an adapter into SAELens' ``SAETrainer``.

Text -> documents (``load_text_dataset``) -> a train / validation / test split by document, shuffled token
contexts (``split_contexts``) -> hooked forward -> the chosen site at sampled
positions and heads -> a shuffling buffer -> batches ``[N, d_k*d_v]`` (dense) or ``[N, d_k + d_v]`` (write
factors, for ``input_layout="factors"``).
"""

from __future__ import annotations

import hashlib
import itertools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Literal

import torch
from torch import Tensor

from .adapters import HookedRecurrentModel, StateCapture


#: the document splits every dataset is cut into (``split_of_document``)
SPLITS = ("train", "validation", "test")
#: default shares of train / validation / test documents
DEFAULT_SPLIT_FRACTIONS = (0.90, 0.05, 0.05)
#: how the documents of ``.txt`` files are found (``load_text_dataset(documents=...)``)
TXT_DOCUMENTS = ("auto", "paragraph", "file", "line")
_PARAGRAPH_BREAK = re.compile(r"\n[ \t\r\f\v]*\n")


def _txt_documents(files: list[Path], documents: str, is_dir: bool) -> list[str]:
    """The documents of ``.txt`` files: ``paragraph`` (blank-line separated), ``file`` (a whole file) or
    ``line``; ``auto`` is ``file`` for a directory and ``paragraph`` for one file. Whitespace-only pieces are
    dropped; a document keeps its inner newlines and indentation."""
    mode = ("file" if is_dir else "paragraph") if documents == "auto" else documents
    out: list[str] = []
    for f in files:
        text = f.read_text(encoding="utf-8")
        if mode == "file":
            pieces = [text]
        elif mode == "line":
            pieces = text.splitlines()
        else:
            pieces = _PARAGRAPH_BREAK.split(text)
        out.extend(p.strip("\r\n") for p in pieces if p.strip())
    return out


def load_text_dataset(source, split: str = "train", text_column: str = "text", documents: str = "auto"):
    """An HF ``datasets.Dataset`` of documents (one row each) from a hub name (its ``split``), a local file
    (``.txt``, ``.jsonl``/``.json``, ``.parquet``), a directory of such files, or an in-memory Dataset / list of
    strings.

    JSON lines / parquet rows and list items are documents. ``.txt``: ``documents="auto"`` (default) makes each
    blank-line separated paragraph of a single file a document, and each file of a directory one document;
    ``"paragraph"``, ``"file"`` or ``"line"`` choose one rule for both."""
    import datasets

    if documents not in TXT_DOCUMENTS:
        raise ValueError(f"documents must be one of {TXT_DOCUMENTS}, got {documents!r}")
    if isinstance(source, datasets.Dataset):
        ds = source
    elif isinstance(source, (list, tuple)) and all(isinstance(s, str) for s in source):
        ds = datasets.Dataset.from_dict({text_column: list(source)})
    else:
        path = Path(str(source))
        if path.exists():
            files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")) \
                if path.is_dir() else [path]
            kinds = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
            exts = {p.suffix for p in files}
            if not files or not exts <= set(kinds) or len({kinds[e] for e in exts}) != 1:
                raise ValueError(f"{source}: expected .txt, .jsonl/.json or .parquet files of one kind, "
                                 f"found {sorted(exts)}")
            builder = kinds[files[0].suffix]
            if builder == "text":
                ds = datasets.Dataset.from_dict({text_column: _txt_documents(files, documents, path.is_dir())})
            else:
                ds = datasets.load_dataset(builder, data_files=[str(p) for p in files], split="train")
        else:
            ds = datasets.load_dataset(str(source), split=split)
    if text_column not in ds.column_names:
        raise ValueError(f"dataset has no {text_column!r} column (columns: {ds.column_names})")
    return ds


def check_split_fractions(fractions) -> tuple[float, float, float]:
    """``(train, validation, test)`` shares: three non-negative numbers summing to 1."""
    fr = tuple(float(f) for f in fractions)
    if len(fr) != 3 or any(not f >= 0 for f in fr) or abs(sum(fr) - 1) > 1e-6:
        raise ValueError(f"split fractions must be three non-negative shares (train, validation, test) summing to 1, "
                         f"got {fractions!r}")
    return fr  # type: ignore[return-value]


def split_of_document(text: str, fractions=DEFAULT_SPLIT_FRACTIONS) -> str:
    """The split of one document: a stable hash of its text (sha256) placed in ``[0, 1)`` against the cumulative
    ``fractions``. Deterministic across runs, machines and orderings; identical documents share a split (a
    duplicated document never sits on both sides of a train / test boundary)."""
    fr = check_split_fractions(fractions)
    u = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") / 2.0 ** 64
    edge = 0.0
    for name, f in zip(SPLITS, fr):
        edge += f
        if u < edge:
            return name
    return next(name for name, f in zip(reversed(SPLITS), reversed(fr)) if f > 0)


def split_documents(texts: Iterable[str], split: str, fractions=DEFAULT_SPLIT_FRACTIONS, seed: int | None = 0
                    ) -> list[str]:
    """The non-blank documents of ``texts`` in ``split`` (see :func:`split_of_document`), in an order shuffled
    with ``seed`` (None: dataset order)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    fr = check_split_fractions(fractions)
    docs = [t for t in texts if t and t.strip() and split_of_document(t, fr) == split]
    if seed is not None:
        g = torch.Generator().manual_seed(int(seed))
        docs = [docs[i] for i in torch.randperm(len(docs), generator=g).tolist()]
    return docs


def shuffle_buffer(items: Iterable, size: int, seed: int = 0) -> Iterator:
    """``items`` in a shuffled order from a buffer of ``size`` (seeded, deterministic; ``size <= 1``: unchanged).
    Each new item replaces a uniformly chosen buffered one, which is yielded; the rest come out shuffled."""
    if size <= 1:
        yield from items
        return
    g = torch.Generator().manual_seed(int(seed))
    buf: list = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        j = int(torch.randint(size, (1,), generator=g))
        out, buf[j] = buf[j], item
        yield out
    for j in torch.randperm(len(buf), generator=g).tolist():
        yield buf[j]


def split_contexts(texts: Iterable[str], tokenizer, context_length: int, split: str,
                   fractions=DEFAULT_SPLIT_FRACTIONS, seed: int = 0, shuffle_contexts: int = 1024,
                   max_contexts: int | None = None) -> Iterator[Tensor]:
    """Token contexts ``[context_length]`` of one document split, as SAE training and the experiments read them.

    The split's documents (:func:`split_documents`, never cut across splits) in a seeded shuffled order, joined
    with EOS between documents, cut into contexts, and the contexts shuffled across documents through a buffer
    of ``shuffle_contexts`` (seeded). Deterministic: the same texts, tokenizer, split, fractions and seed give
    the same stream (so an activation store extracted from it, a resumed run and another rank agree)."""
    docs = split_documents(texts, split, fractions, seed)
    stream = token_contexts(docs, tokenizer, context_length)
    out = shuffle_buffer(stream, shuffle_contexts, seed + 1)
    return out if max_contexts is None else itertools.islice(out, max_contexts)


def token_contexts(texts: Iterable[str], tokenizer, context_length: int, separator_id: int | None = None,
                   max_contexts: int | None = None) -> Iterator[Tensor]:
    """Concatenate tokenized documents (each followed by ``separator_id``, default eos) and cut
    ``[context_length]`` contexts (in order; :func:`split_contexts` splits and shuffles)."""
    if context_length < 2:
        raise ValueError(f"context_length must be >= 2, got {context_length}")
    sep = tokenizer.eos_token_id if separator_id is None else separator_id
    buf: list[int] = []
    n = 0
    for text in texts:
        buf.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if sep is not None:
            buf.append(sep)
        while len(buf) >= context_length:
            yield torch.tensor(buf[:context_length], dtype=torch.long)
            buf = buf[context_length:]
            n += 1
            if max_contexts is not None and n >= max_contexts:
                return


@dataclass
class SiteSpec:
    """Which activations to stream.

    ``layer``: one recurrent layer or a list (samples of every listed layer go into one stream).
    ``site``: ``"write"`` (the factored write, raw or delta) or ``"state"``. ``positions``: ``"all"``,
    ``"last"`` (final position of each context), ``("stride", s)`` or ``("random", n)`` per context.
    ``heads``: value heads to take (None: all; each head's matrix is one sample).
    """

    layer: int | list[int]
    site: Literal["write", "state"] = "state"
    heads: list[int] | None = None
    positions: str | tuple[str, int] = "all"
    write_mode: Literal["raw", "delta"] = "raw"
    layout: Literal["dense", "factors"] = "dense"
    skip_first: int = 0  # positions to drop at the start of each context (e.g. a BOS)

    def __post_init__(self):
        if self.site not in ("write", "state"):
            raise ValueError(f"site must be 'write' or 'state', got {self.site!r}")
        if self.layout == "factors" and self.site != "write":
            raise ValueError("layout='factors' needs site='write' (a state is not rank 1)")
        p = self.positions
        if not (p in ("all", "last") or (isinstance(p, tuple) and len(p) == 2 and p[0] in ("stride", "random")
                                          and int(p[1]) > 0)):
            raise ValueError(f"positions must be 'all', 'last', ('stride', s) or ('random', n), got {p!r}")


def select_positions(spec: SiteSpec, T: int, context_index: int = 0, seed: int = 0) -> list[int]:
    """The positions of one context of length ``T`` that ``spec`` samples. ``("random", n)`` draws them from a
    generator seeded by ``(seed, context_index)``, so a context gets the same positions whether it is streamed,
    extracted into a store, or read back on another rank."""
    lo = spec.skip_first
    if spec.positions == "all":
        return list(range(lo, T))
    if spec.positions == "last":
        return [T - 1]
    kind, n = spec.positions
    if kind == "stride":
        return list(range(lo, T, int(n)))
    n = min(int(n), T - lo)
    g = torch.Generator().manual_seed((int(seed) * 1_000_003 + int(context_index)) % (2 ** 63))
    return sorted((torch.randperm(T - lo, generator=g)[:n] + lo).tolist())


def position_index(spec: SiteSpec, b: int, T: int, first_context: int = 0, seed: int = 0) -> Tensor:
    """``[b, P]`` positions sampled in rows ``first_context .. first_context + b - 1`` of the context stream."""
    return torch.tensor([select_positions(spec, T, first_context + i, seed) for i in range(b)], dtype=torch.long)


@torch.no_grad()
def collect_sites(model: HookedRecurrentModel, tokens: Tensor, layers: list[int], heads: list[int], site: str,
                  pos: Tensor, write_mode: str = "raw") -> dict[int, dict[str, Tensor]]:
    """One forward of ``tokens`` ``[b, T]`` (stopped after the last layer needed): per layer, the site at the
    positions ``pos`` ``[b, P]`` and the value heads ``heads``: ``{"key": [b, P, h, d_k], "value": [b, P, h, d_v]}``
    (write site, the factors) or ``{"state": [b, P, h, d_k, d_v]}``. The same values, bit for bit, whichever
    other layers are collected in the same forward."""
    b, P = pos.shape
    prefixes = {layer: model.hook_prefix(layer) for layer in layers}
    stop = max(layers) + 1
    stop = None if stop >= model.cfg.n_layers else stop
    if site == "state":
        union = sorted(set(pos.flatten().tolist()))
        where = {p: i for i, p in enumerate(union)}
        idx = torch.tensor([[where[p] for p in row] for row in pos.tolist()], dtype=torch.long)
        with model.options(capture_states=StateCapture(union, heads)):
            _, cache = model.run_with_cache(tokens, names_filter=[p + "hook_state" for p in prefixes.values()],
                                            stop_at_layer=stop)
        out = {}
        for layer, prefix in prefixes.items():
            S = cache[prefix + "hook_state"]  # [b, U, h, d_k, d_v]
            i = idx.to(S.device)[:, :, None, None, None].expand(b, P, *S.shape[2:])
            out[layer] = {"state": S.gather(1, i)}
        return out
    names = [p + n for p in prefixes.values() for n in ("hook_write_key", "hook_write_value")]
    with model.options(write_mode=write_mode):
        _, cache = model.run_with_cache(tokens, names_filter=names, stop_at_layer=stop)
    out = {}
    hs = torch.tensor(heads, dtype=torch.long)
    for layer, prefix in prefixes.items():
        got = {}
        for key, name in (("key", "hook_write_key"), ("value", "hook_write_value")):
            x = cache[prefix + name].index_select(2, hs.to(cache[prefix + name].device))  # [b, T, h, d]
            i = pos.to(x.device)[:, :, None, None].expand(b, P, *x.shape[2:])
            got[key] = x.gather(1, i)
        out[layer] = got
    return out


def flatten_site(got: dict[str, Tensor], layout: str) -> Tensor:
    """``collect_sites`` output of one layer as training samples in ``(row, position, head)`` order:
    ``[N, d_k*d_v]`` (dense) or ``[N, d_k + d_v]`` (write factors)."""
    if "state" in got:
        S = got["state"]
        return S.reshape(-1, S.shape[-2] * S.shape[-1])
    k, v = got["key"].reshape(-1, got["key"].shape[-1]), got["value"].reshape(-1, got["value"].shape[-1])
    if layout == "factors":
        return torch.cat([k, v], dim=-1)
    return (k[:, :, None] * v[:, None, :]).reshape(k.shape[0], -1)


def check_spec(model: HookedRecurrentModel, spec: SiteSpec) -> tuple[list[int], list[int]]:
    """``(layers, heads)`` of ``spec``, checked against the model (clear errors for unknown layers / heads)."""
    cfg = model.cfg
    layers = [spec.layer] if isinstance(spec.layer, int) else list(spec.layer)
    bad = [layer for layer in layers if layer not in cfg.recurrent_layers]
    if bad or not layers:
        raise ValueError(f"layers {bad or layers} are not recurrent; recurrent layers: {list(cfg.recurrent_layers)}")
    heads = list(range(cfg.n_heads)) if spec.heads is None else list(spec.heads)
    if not heads or any(not 0 <= h < cfg.n_heads for h in heads):
        raise ValueError(f"heads {heads} out of range for {cfg.n_heads} value heads")
    return layers, heads


@torch.no_grad()
def site_activations(model: HookedRecurrentModel, tokens: Tensor, spec: SiteSpec, first_context: int = 0,
                     seed: int = 0) -> Tensor:
    """Samples of the site for one token batch ``[b, T]`` (rows ``first_context ...`` of the context stream, which
    seeds random positions): ``[N, d_k*d_v]`` or ``[N, d_k + d_v]``, in ``(layer, row, position, head)`` order."""
    layers, heads = check_spec(model, spec)
    pos = position_index(spec, tokens.shape[0], tokens.shape[1], first_context, seed)
    got = collect_sites(model, tokens, layers, heads, spec.site, pos, spec.write_mode)
    return torch.cat([flatten_site(got[layer], spec.layout) for layer in layers])


class ActivationProvider(Iterator[Tensor]):
    """Iterator of shuffled training batches for ``SAETrainer`` (``data_provider=``).

    ``contexts`` yields token contexts ``[T]``; ``batch_size`` samples per batch; a buffer of
    ``buffer_batches`` batches is refilled at half capacity and shuffled (``seed``).

    ``normalize=True`` multiplies every matrix by one constant ``scale`` (estimated on the first buffer so
    that the mean Frobenius norm is ``sqrt(d_in)``, as SAELens' ``expected_average_only_in``); factors are
    each multiplied by ``sqrt(scale)``. ``train_write_sae`` folds ``scale`` back into the SAE.

    ``("random", n)`` positions are drawn per context from ``(position_seed, index in the stream)``, the index
    counting from ``first_context`` (so a stream split into validation and training contexts, or read back from
    an activation store, samples each context at the same positions).

    ``state_dict()`` / ``load_state_dict()`` save and restore the stream's position (contexts consumed and a hash
    of them, the shuffle buffer, the RNG, the scale): a fresh provider over the same contexts, loaded with a saved
    state, yields exactly the batches the saved one would have yielded next.

    ``drop_last`` (training, the default): every batch has ``batch_size`` rows and the stream's last
    ``< batch_size`` samples are not used; ``drop_last=False`` (validation, evaluation) yields them as a last,
    smaller batch, so a held-out set smaller than one batch is still evaluated.
    """

    def __init__(self, model: HookedRecurrentModel, contexts: Iterable[Tensor], spec: SiteSpec,
                 batch_size: int = 256, buffer_batches: int = 16, forward_batch: int = 8, seed: int = 0,
                 device: str | torch.device = "cpu", normalize: bool = False, first_context: int = 0,
                 position_seed: int | None = None, drop_last: bool = True):
        if batch_size < 1 or buffer_batches < 2 or forward_batch < 1:
            raise ValueError("batch_size, forward_batch >= 1 and buffer_batches >= 2 are required")
        self.model, self.spec, self.batch_size = model, spec, batch_size
        self.contexts = iter(contexts)
        self.capacity = batch_size * buffer_batches
        self.forward_batch = forward_batch
        self.seed = seed
        self.first_context = first_context  # index of the first context in the whole stream (seeds positions)
        self.position_seed = seed if position_seed is None else position_seed
        self.generator = torch.Generator().manual_seed(seed)
        self.device = torch.device(device)
        self.buffer: Tensor | None = None
        self.exhausted = False
        self.samples_seen = 0
        self.normalize = normalize
        self.scale: float = 1.0
        self.scale_set = False  # estimated on the first buffer, or restored from a checkpoint
        self.contexts_consumed = 0
        self._digest = hashlib.sha256()
        self.drop_last = drop_last  # False for evaluation: the stream's last, partial batch is yielded too

    def matrix_norms(self, x: Tensor) -> Tensor:
        cfg = self.model.cfg
        if self.spec.layout == "factors":
            return x[:, : cfg.d_k].norm(dim=-1) * x[:, cfg.d_k:].norm(dim=-1)
        return x.norm(dim=-1)

    def apply_scale(self, x: Tensor, scale: float | None = None) -> Tensor:
        s = self.scale if scale is None else scale
        return x * (s ** 0.5 if self.spec.layout == "factors" else s)

    def _refill(self) -> None:
        chunks = [] if self.buffer is None else [self.buffer]
        have = 0 if self.buffer is None else self.buffer.shape[0]
        while have < self.capacity and not self.exhausted:
            acts = self._next_chunk()
            if acts is None:
                break
            if not torch.isfinite(acts).all():
                raise ValueError("non-finite activations from the model")
            chunks.append(acts)
            have += acts.shape[0]
        if chunks:
            buf = torch.cat(chunks)
            if self.normalize and not self.scale_set:
                d_in = self.model.cfg.d_k * self.model.cfg.d_v
                mean_norm = self.matrix_norms(buf).mean().item()
                if mean_norm <= 0:
                    raise ValueError("all activations are zero; cannot normalise")
                self.scale = d_in ** 0.5 / mean_norm
                self.scale_set = True
                buf = self.apply_scale(buf)
            elif self.normalize:
                n_old = 0 if self.buffer is None else 1  # the buffer's rows are already scaled
                if len(chunks) > n_old:
                    buf = torch.cat(chunks[:n_old] + [self.apply_scale(torch.cat(chunks[n_old:]))])
            self.buffer = buf[torch.randperm(buf.shape[0], generator=self.generator)]

    def _next_chunk(self) -> Tensor | None:
        """The samples of the next ``forward_batch`` contexts (one forward), or None when the stream ended."""
        batch = []
        for _ in range(self.forward_batch):
            try:
                batch.append(self._next_context())
            except StopIteration:
                self.exhausted = True
                break
        if not batch:
            return None
        tokens = torch.stack(batch).to(self.model.cfg.device)
        first = self.first_context + self.contexts_consumed - len(batch)
        return site_activations(self.model, tokens, self.spec, first, self.position_seed).to(self.device)

    def _next_context(self) -> Tensor:
        ctx = next(self.contexts)
        self.contexts_consumed += 1
        self._digest.update(torch.as_tensor(ctx).to(torch.int64).cpu().numpy().tobytes())
        return ctx

    def state_dict(self) -> dict:
        """The stream's position: JSON-able values plus the tensors ``buffer`` and ``generator``."""
        return {"contexts_consumed": self.contexts_consumed, "contexts_sha256": self._digest.hexdigest(),
                "samples_seen": self.samples_seen, "exhausted": self.exhausted, "normalize": self.normalize,
                "scale": self.scale, "scale_set": self.scale_set,
                "buffer": None if self.buffer is None else self.buffer.detach().cpu(),
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        """Continue where ``state`` left off: skip the contexts it consumed (checking they are the same ones),
        restore its buffer, RNG and scale (never re-estimated)."""
        if self.contexts_consumed or self.buffer is not None:
            raise RuntimeError("load_state_dict needs a fresh ActivationProvider (this one has already streamed)")
        if bool(state["normalize"]) != self.normalize:
            raise ValueError(f"the saved stream was {'' if state['normalize'] else 'not '}normalised, this provider "
                             f"is {'' if self.normalize else 'not '}(normalize={self.normalize})")
        n = int(state["contexts_consumed"])
        self._skip_contexts(n)
        if self._digest.hexdigest() != state["contexts_sha256"]:
            raise ValueError(f"the first {n} contexts of this stream differ from the ones the saved stream consumed; "
                             "resume with the same dataset, context length and validation split")
        self.samples_seen = int(state["samples_seen"])
        self.exhausted = bool(state["exhausted"])
        self.scale, self.scale_set = float(state["scale"]), bool(state["scale_set"])
        buf = state.get("buffer")
        self.buffer = None if buf is None else buf.to(self.device)
        self.generator.set_state(state["generator"])

    def _skip_contexts(self, n: int) -> None:
        """Consume the first ``n`` contexts of the stream (adding them to the digest) without using them."""
        for i in range(n):
            try:
                self._next_context()
            except StopIteration:
                raise ValueError(f"the context stream ended after {i} contexts, but the saved stream had consumed "
                                 f"{n}; resume with the same dataset, context length and validation split") from None

    def __next__(self) -> Tensor:
        if self.buffer is None or self.buffer.shape[0] < self.capacity // 2:
            self._refill()
        if self.buffer is None or self.buffer.shape[0] == 0:
            raise StopIteration
        if self.buffer.shape[0] < self.batch_size and (self.drop_last or not self.exhausted):
            raise StopIteration
        out, self.buffer = self.buffer[: self.batch_size], self.buffer[self.batch_size:]
        self.samples_seen += out.shape[0]
        return out

    def __iter__(self):
        return self
