"""Streaming per-atom statistics for atom dashboards: one update per batch of codes, for every atom at once.

``AtomStats.update(codes, tokens, ...)`` takes the SAE codes of a batch of contexts and keeps, per atom:

* counts: positions seen, firings (``a != 0``), sum and max of the activation;
* ``top_k`` largest activations with their (context, position) and a window of the atom's activations and
  the token ids around each one (exact: the batch's own top-k merged with the running top-k);
* a uniform sample of ``reservoir`` firings (bottom-R keys: every firing draws a random key and the R
  smallest are kept, so the kept set is a uniform sample without replacement of all firings so far; when
  there are at most R firings it is all of them), with (context, position, activation, window): the
  quantile samples and quantile values come from it;
* an exact histogram of the nonzero activations on fixed log10-spaced bins (``HIST_EDGES``), plus counts
  of negative activations;
* the key side: the ``top_k`` largest and smallest ``u_i . k_t`` over all positions with their token ids;
* the write's life in the state: for ``d = 0..horizon``, the sum over firings of the head's decay
  ``exp(G_{t+d} - G_t)`` (``G = cumsum(log decay)``), and for state-site SAEs the sum of ``a(t+d) / a(t)``
  and of ``[a(t+d) != 0]`` over onsets (firings with ``a(t-1) = 0``), with their counts (a firing whose
  ``t + d`` is past the context does not count at that ``d``).

Tensors are fp32 on CPU; ``n`` atoms, ``K = top_k``, ``R = reservoir``, ``W = window`` (``before + 1 + after``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

#: histogram bin edges of |activation| (log10-spaced, 8 bins per decade from 1e-6 to 1e6); values below the
#: first edge count in bin 0, above the last in the last bin
HIST_EDGES = torch.logspace(-6, 6, 12 * 8 + 1, dtype=torch.float64)


@dataclass
class StatsConfig:
    """``top_k``: top activations (and key-side extremes) kept per atom; ``reservoir``: firings sampled
    uniformly per atom; ``before`` / ``after``: tokens of context kept around each kept firing;
    ``horizon``: positions after a firing of the persistence / decay curves; ``seed``: reservoir keys."""

    top_k: int = 20
    reservoir: int = 200
    before: int = 24
    after: int = 8
    horizon: int = 32
    seed: int = 0

    def __post_init__(self):
        for name in ("top_k", "reservoir"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("before", "after", "horizon"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be non-negative, got {getattr(self, name)}")


def _merge_top(vals: Tensor, meta: dict[str, Tensor], new_vals: Tensor, new_meta: dict[str, Tensor], k: int,
               largest: bool = True):
    """Merge ``[n, k0]`` kept entries with ``[n, k1]`` new ones, keeping the ``k`` largest (or smallest) per
    row; ``meta`` tensors are ``[n, k, ...]`` and follow their values."""
    cat = torch.cat([vals, new_vals], 1)
    kk = min(k, cat.shape[1])
    top, idx = cat.topk(kk, dim=1, largest=largest, sorted=True)
    out = {}
    for name, m in meta.items():
        both = torch.cat([m, new_meta[name]], 1)
        gather = idx.view(idx.shape + (1,) * (both.dim() - 2)).expand(idx.shape + both.shape[2:])
        out[name] = both.gather(1, gather)
    return top, out


class AtomStats:
    """The accumulator (see the module docstring). ``n_atoms``: the SAE's ``d_sae``; ``state_site``: whether
    the codes are of states (persistence curves are then kept)."""

    def __init__(self, n_atoms: int, cfg: StatsConfig | None = None, state_site: bool = False):
        self.cfg = cfg = cfg or StatsConfig()
        self.n = n = n_atoms
        self.state_site = state_site
        self.W = cfg.before + 1 + cfg.after
        self.positions = 0
        self.contexts = 0
        self.fires = torch.zeros(n, dtype=torch.long)
        self.act_sum = torch.zeros(n, dtype=torch.float64)
        self.act_max = torch.full((n,), -torch.inf)
        self.negative = torch.zeros(n, dtype=torch.long)
        self.hist = torch.zeros(n, len(HIST_EDGES) + 1, dtype=torch.long)
        empty = {"ctx": torch.zeros(n, 0, dtype=torch.long), "pos": torch.zeros(n, 0, dtype=torch.long),
                 "win_tok": torch.zeros(n, 0, self.W, dtype=torch.long), "win_act": torch.zeros(n, 0, self.W)}
        self.top_vals, self.top_meta = torch.zeros(n, 0), dict(empty)
        self.res_keys, self.res_meta = torch.zeros(n, 0), {**empty, "act": torch.zeros(n, 0)}
        kempty = {"ctx": torch.zeros(n, 0, dtype=torch.long), "pos": torch.zeros(n, 0, dtype=torch.long),
                  "tok": torch.zeros(n, 0, dtype=torch.long)}
        self.key_hi, self.key_hi_meta = torch.zeros(n, 0), dict(kempty)
        self.key_lo, self.key_lo_meta = torch.zeros(n, 0), dict(kempty)
        H = cfg.horizon + 1
        self.decay_sum = torch.zeros(n, H, dtype=torch.float64)
        self.decay_n = torch.zeros(n, H, dtype=torch.long)
        self.persist_sum = torch.zeros(n, H, dtype=torch.float64)
        self.alive_sum = torch.zeros(n, H, dtype=torch.float64)
        self.onset_n = torch.zeros(n, H, dtype=torch.long)
        self._gen = torch.Generator().manual_seed(cfg.seed)

    # ------------------------------------------------------------------------------------------ update
    def _windows(self, source: Tensor, b: Tensor, t: Tensor, atom: Tensor | None, fill) -> Tensor:
        """``source`` ``[B, T]`` (tokens) or ``[B, T, n]`` (codes, with ``atom`` of each entry): the window around
        each ``(b, t)`` (``b``, ``t``: ``[...]``; result ``[..., W]``), ``fill`` outside the context."""
        T = source.shape[1]
        offs = torch.arange(-self.cfg.before, self.cfg.after + 1)
        p = t[..., None] + offs  # [n, k, W]
        inside = (p >= 0) & (p < T)
        pc = p.clamp(0, T - 1)
        bb = b[..., None].expand_as(pc)
        if atom is None:
            w = source[bb, pc]
        else:
            w = source[bb, pc, atom.view(atom.shape + (1,) * (pc.dim() - atom.dim())).expand_as(pc)]
        return torch.where(inside, w, torch.full_like(w, fill))

    def _merge_windowed(self, vals: Tensor, meta: dict, new_vals: Tensor, new_idx: Tensor, new_extra: dict,
                        k: int, largest: bool, codes: Tensor, tokens: Tensor, off: int):
        """Merge kept ``[n, k0]`` entries (with their windows) with a batch's candidates ``new_vals`` at flat
        positions ``new_idx`` ``[n, k1]``; windows are gathered only for candidates that are kept."""
        T = tokens.shape[1]
        n, k0 = vals.shape
        b, t = new_idx // T, new_idx % T
        cat = torch.cat([vals, new_vals], 1)
        kk = min(k, cat.shape[1])
        top, idx = cat.topk(kk, dim=1, largest=largest, sorted=True)
        is_new = idx >= k0
        old_i, new_i = idx.clamp(max=max(k0 - 1, 0)), (idx - k0).clamp(min=0)
        out = {}
        small = {"ctx": b + off, "pos": t, **new_extra}
        for name, new in small.items():
            old = meta[name].gather(1, old_i) if k0 else torch.zeros_like(new.gather(1, new_i))
            out[name] = torch.where(is_new, new.gather(1, new_i), old)
        W = self.W
        rows, slots = is_new.nonzero(as_tuple=True)
        for name, fill in (("win_tok", -1), ("win_act", 0.0)):
            old = meta[name]
            dtype = old.dtype
            res = old.gather(1, old_i[..., None].expand(n, kk, W)) if k0 else torch.full((n, kk, W), fill, dtype=dtype)
            if rows.numel():
                bb, tt = b[rows, new_i[rows, slots]], t[rows, new_i[rows, slots]]
                src = tokens if name == "win_tok" else codes
                w = self._windows(src, bb, tt, rows if name == "win_act" else None, fill)
                res[rows, slots] = w.to(dtype)
            out[name] = res
        return top, out

    @torch.no_grad()
    def update(self, codes: Tensor, tokens: Tensor, key_dot: Tensor | None = None,
               log_decay: Tensor | None = None, context_offset: int | None = None) -> None:
        """Add a batch: ``codes`` ``[B, T, n]``, ``tokens`` ``[B, T]`` (ids), ``key_dot`` ``[B, T, n]`` =
        ``u_i . k_t`` (optional), ``log_decay`` ``[B, T]`` of the SAE's head (optional). Contexts are numbered
        in the order they arrive (or from ``context_offset``)."""
        codes = codes.detach().float().cpu()
        tokens = tokens.detach().cpu().long()
        B, T, n = codes.shape
        if n != self.n:
            raise ValueError(f"codes have {n} atoms, the accumulator {self.n}")
        if tokens.shape != (B, T):
            raise ValueError(f"tokens {tuple(tokens.shape)} do not match codes {tuple(codes.shape)}")
        off = self.contexts if context_offset is None else context_offset
        cfg = self.cfg
        flat = codes.reshape(B * T, n)
        fire = flat != 0
        self.positions += B * T
        self.contexts += B
        self.fires += fire.sum(0)
        self.act_sum += flat.double().sum(0)
        self.act_max = torch.maximum(self.act_max, flat.max(0).values)
        self.negative += (flat < 0).sum(0)
        nz = fire.nonzero()  # [F, 2]: (row, atom)
        if nz.numel():
            vals = flat[nz[:, 0], nz[:, 1]].abs().double()
            bins = torch.bucketize(vals, HIST_EDGES, right=True)
            self.hist.view(-1).index_put_((nz[:, 1] * self.hist.shape[1] + bins,),
                                          torch.ones(len(bins), dtype=torch.long), accumulate=True)
        # top-k activations: the batch's own top-k per atom, merged; windows only for the entries that stay
        k = min(cfg.top_k, B * T)
        bv, bi = flat.T.topk(k, dim=1)  # [n, k]
        self.top_vals, self.top_meta = self._merge_windowed(self.top_vals, self.top_meta, bv, bi, {}, cfg.top_k,
                                                            True, codes, tokens, off)
        # reservoir: random keys, firings only (non-firings get key +inf and are dropped at the end)
        keys = torch.rand(B * T, n, generator=self._gen)
        keys = torch.where(fire, keys, torch.full_like(keys, torch.inf))
        r = min(cfg.reservoir, B * T)
        kv, ki = keys.T.topk(r, dim=1, largest=False)
        self.res_keys, self.res_meta = self._merge_windowed(self.res_keys, self.res_meta, kv, ki,
                                                            {"act": flat.T.gather(1, ki)}, cfg.reservoir, False,
                                                            codes, tokens, off)
        if key_dot is not None:
            kd = key_dot.detach().float().cpu().reshape(B * T, n).T  # [n, B*T]
            tok_flat = tokens.reshape(-1)
            for largest, attr in ((True, "key_hi"), (False, "key_lo")):
                v, i = kd.topk(k, dim=1, largest=largest)
                m = {"ctx": i // T + off, "pos": i % T, "tok": tok_flat[i]}
                vals, meta2 = _merge_top(getattr(self, attr), getattr(self, attr + "_meta"), v, m, cfg.top_k,
                                         largest=largest)
                setattr(self, attr, vals)
                setattr(self, attr + "_meta", meta2)
        self._curves(codes, log_decay)

    def _curves(self, codes: Tensor, log_decay: Tensor | None) -> None:
        B, T, n = codes.shape
        H = self.cfg.horizon + 1
        fire = (codes != 0).float()  # [B, T, n]
        d = torch.arange(H)
        valid = (torch.arange(T)[:, None] + d[None, :] < T).float()  # [T, H]: t + d inside the context
        if log_decay is not None:
            G = log_decay.detach().double().cpu().cumsum(1)  # [B, T]
            idx = (torch.arange(T)[:, None] + d[None, :]).clamp(max=T - 1)
            dec = ((G[:, idx] - G[:, :, None]).exp() * valid).float()  # [B, T, H]
            self.decay_sum += torch.einsum("btn,btd->nd", fire, dec).double()
            self.decay_n += torch.einsum("btn,td->nd", fire, valid).round().long()
        if self.state_site:
            prev = torch.cat([torch.zeros(B, 1, n), fire[:, :-1]], 1)
            onset = fire * (1 - prev)
            ratio = torch.where(onset > 0, 1.0 / torch.where(onset > 0, codes, torch.ones_like(codes)),
                                torch.zeros_like(codes))
            pad = torch.cat([codes, torch.zeros(B, H - 1, n)], 1)  # a(t + d), 0 past the context
            padf = (pad != 0).float()
            for k in range(H):
                self.persist_sum[:, k] += (ratio * pad[:, k:k + T]).sum((0, 1)).double()
                self.alive_sum[:, k] += (onset * padf[:, k:k + T]).sum((0, 1)).double()
            self.onset_n += torch.einsum("btn,td->nd", onset, valid).round().long()

    # ----------------------------------------------------------------------------------------- results
    def top(self, atom: int) -> list[dict]:
        """The atom's kept top activations (largest first), firings only: ``{"act", "ctx", "pos",
        "tokens" [W] (-1 outside the context), "acts" [W], "center"}``."""
        out = []
        for j in range(self.top_vals.shape[1]):
            a = float(self.top_vals[atom, j])
            if a == 0:
                continue
            out.append({"act": a, "ctx": int(self.top_meta["ctx"][atom, j]), "pos": int(self.top_meta["pos"][atom, j]),
                        "tokens": self.top_meta["win_tok"][atom, j].tolist(),
                        "acts": self.top_meta["win_act"][atom, j].tolist(), "center": self.cfg.before})
        return [o for o in out if o["act"] > 0] + [o for o in out if o["act"] < 0]

    def sample(self, atom: int) -> list[dict]:
        """The atom's reservoir (a uniform sample of its firings), sorted by activation (ascending)."""
        keys = self.res_keys[atom]
        keep = torch.isfinite(keys).nonzero().flatten()
        rows = [{"act": float(self.res_meta["act"][atom, j]), "ctx": int(self.res_meta["ctx"][atom, j]),
                 "pos": int(self.res_meta["pos"][atom, j]), "tokens": self.res_meta["win_tok"][atom, j].tolist(),
                 "acts": self.res_meta["win_act"][atom, j].tolist(), "center": self.cfg.before} for j in keep.tolist()]
        return sorted(rows, key=lambda r: (r["act"], r["ctx"], r["pos"]))

    def quantiles(self, atom: int, qs=(0.1, 0.25, 0.5, 0.75, 0.9), sample: list | None = None) -> dict[str, float]:
        """Quantiles of the atom's activation over its firings, from the reservoir (exact when the atom fired
        at most ``reservoir`` times; numpy's linear interpolation). ``sample``: ``self.sample(atom)`` if known."""
        import numpy as np

        vals = [r["act"] for r in (self.sample(atom) if sample is None else sample)]
        if not vals:
            return {}
        return {f"{q:g}": float(np.quantile(np.asarray(vals), q)) for q in qs}

    def histogram(self, atom: int) -> dict:
        """``{"edges": [...], "counts": [...]}``: the nonempty span of the atom's exact |activation| histogram
        (``counts[j]`` counts values in ``[edges[j], edges[j+1])``; the first/last bins also hold values
        below/above the edge range)."""
        h = self.hist[atom]
        nz = h.nonzero().flatten()
        if not nz.numel():
            return {"edges": [], "counts": []}
        lo, hi = int(nz.min()), int(nz.max())
        edges = torch.cat([HIST_EDGES[:1] * 0, HIST_EDGES, HIST_EDGES[-1:] * 10])  # bin j spans edges[j..j+1]
        return {"edges": edges[lo:hi + 2].tolist(), "counts": h[lo:hi + 1].tolist()}

    def key_side(self, atom: int) -> dict:
        """Top and bottom ``u_i . k_t`` over the data: ``{"top": [{"value", "token", "ctx", "pos"}], "bottom"}``."""
        out = {}
        for attr, name in (("key_hi", "top"), ("key_lo", "bottom")):
            vals, meta = getattr(self, attr), getattr(self, attr + "_meta")
            out[name] = [{"value": float(vals[atom, j]), "token": int(meta["tok"][atom, j]),
                          "ctx": int(meta["ctx"][atom, j]), "pos": int(meta["pos"][atom, j])}
                         for j in range(vals.shape[1])]
        return out

    def curves(self, atom: int) -> dict:
        """``decay[d]``: mean head decay ``exp(G_{t+d} - G_t)`` over the atom's firings (``n_decay[d]``);
        state site: ``persistence[d]`` mean ``a(t+d) / a(t)`` and ``alive[d]`` fraction still active, over
        onsets (``n_onsets[d]``); ``None`` where nothing was counted."""
        def mean(s, c):
            return [float(x / m) if m else None for x, m in zip(s[atom].tolist(), c[atom].tolist())]

        out = {"decay": mean(self.decay_sum, self.decay_n), "n_decay": self.decay_n[atom].tolist()}
        if self.state_site:
            out.update(persistence=mean(self.persist_sum, self.onset_n), alive=mean(self.alive_sum, self.onset_n),
                       n_onsets=self.onset_n[atom].tolist())
        return out

    def density(self) -> Tensor:
        """Firing density ``[n]``: firings / positions."""
        return self.fires.double() / max(self.positions, 1)
