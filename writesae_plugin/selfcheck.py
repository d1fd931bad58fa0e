"""Self-check of the write hooks on a model: inventory, bit-identity, reference parity, exact edits, the
resumed and cached paths the experiment commands use, timing.

Every number is measured on the given model and tokens; nothing is assumed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

import copy

from .adapters import HookedRecurrentModel, WriteEdit
from .adapters.reference import gated_deltanet_reference


@dataclass
class CheckResult:
    name: str
    value: float
    tolerance: float | None  # None: informational
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.tolerance is None or self.value <= self.tolerance


@dataclass
class SelfCheck:
    results: list[CheckResult] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.results)

    def table(self) -> str:
        lines = [f"{'check':52s} {'measured':>12s} {'limit':>10s}  status"]
        for r in self.results:
            lim = "-" if r.tolerance is None else f"{r.tolerance:.0e}"
            status = "info" if r.tolerance is None else ("ok" if r.ok else "FAIL")
            lines.append(f"{r.name:52s} {r.value:12.3e} {lim:>10s}  {status} {r.detail}")
        return "\n".join(lines)


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def reference_read(model: HookedRecurrentModel, cache, layer: int, write_edits: dict | None = None) -> torch.Tensor:
    """The per-token reference recurrence of ``layer`` on captured hooks (the family's own oracle);
    ``write_edits[(b, t, h)] = W_new`` (raw mode)."""
    p = model.hook_prefix(layer)
    if model.family.name in ("mamba2", "mamba_ssm", "xlstm"):  # scalar-decay frame (xLSTM: the stabilised C~)
        from .adapters.mamba2 import mamba2_reference

        return mamba2_reference(cache[p + "hook_write_key"], cache[p + "hook_write_value"], cache[p + "hook_log_decay"],
                                cache[p + "hook_query"], write_edits=write_edits)[0]
    edits = {k: (v, "raw") for k, v in (write_edits or {}).items()}
    if model.family.name == "rwkv7":  # DPLR transitions: per-channel decay and the a . kk^ erase
        from .adapters.rwkv7 import rwkv7_reference

        return rwkv7_reference(cache[p + "hook_query"], cache[p + "hook_write_key"], cache[p + "hook_write_value"],
                               cache[p + "hook_log_decay"], cache[p + "hook_kk"], cache[p + "hook_a"],
                               write_edits=edits).read
    if model.family.name == "gla":  # per-channel decay, no erase
        from .adapters.gla import gla_reference

        return gla_reference(cache[p + "hook_query"], cache[p + "hook_write_key"], cache[p + "hook_write_value"],
                             cache[p + "hook_log_decay"], write_edits=edits).read
    return gated_deltanet_reference(cache[p + "hook_query"], cache[p + "hook_write_key"], cache[p + "hook_v"],
                                    cache[p + "hook_log_decay"], cache[p + "hook_beta"], write_edits=edits).read


def run_selfcheck(model: HookedRecurrentModel, tokens: torch.Tensor, repeats: int = 5,
                  progress: bool = False) -> SelfCheck:
    """Run the checks on ``tokens`` ``[b, T]`` (``T >= 2``); ``progress``: a tqdm bar on stderr, one step per check
    (the reference parity and the three cached / resumed paths of every recurrent layer, then the timings)."""
    from tqdm.auto import tqdm

    out = SelfCheck()
    hf = model.hf_model
    b, T = tokens.shape
    layers = list(model.cfg.recurrent_layers)
    bar = tqdm(total=2 + 2 * len(layers) + 3, desc="self-check", unit="check", disable=not progress,
               dynamic_ncols=True)
    with torch.no_grad(), bar:
        plain = hf(input_ids=tokens).logits
        hooked, cache = model.run_with_cache(tokens)
        bar.update()
        out.results.append(CheckResult("capture-only logits vs plain HF (max |diff|)",
                                       (hooked - plain).abs().max().item(), 0.0))
        for layer in model.cfg.recurrent_layers:
            p = model.hook_prefix(layer)
            read = cache[p + "hook_read"]
            # 1e-5 relative to the reads' scale: a trained model's reads reach tens, where two fp32 summation
            # orders (chunked kernel, per-token reference) differ by ~1e-6 relative (as the decode check below)
            out.results.append(CheckResult(f"layer {layer}: hook_read vs per-token reference",
                                           (reference_read(model, cache, layer) - read).abs().max().item(),
                                           1e-5 * max(1.0, read.abs().max().item())))
            bar.update()
        layer = model.cfg.recurrent_layers[0]
        p = model.hook_prefix(layer)
        pos, head = T // 2, model.cfg.n_heads - 1
        g = torch.Generator().manual_seed(0)
        u, w = torch.randn(model.cfg.d_k, generator=g), torch.randn(model.cfg.d_v, generator=g)
        edit = WriteEdit(layer=layer, pos=pos, head=head, batch=0, key=u, value=w)
        with model.edits([edit]):
            _, edited = model.run_with_cache(tokens, names_filter=[p + "hook_read"])
        ref = reference_read(model, cache, layer, {(0, pos, head): torch.outer(u, w)})
        out.results.append(CheckResult(f"layer {layer}: exact edit at t={pos} vs edited reference",
                                       (ref - edited[p + "hook_read"]).abs().max().item(),
                                       1e-5 * max(1.0, ref.abs().max().item())))
        out.results.append(CheckResult("edit: change before the edited position", (
            edited[p + "hook_read"][:, :pos] - cache[p + "hook_read"][:, :pos]).abs().max().item(), 0.0))
        bar.update()
        _check_resume_paths(model, tokens, out, bar)
        bar.set_postfix_str("timing")
        t_plain = _median_time(lambda: hf(input_ids=tokens), repeats)
        bar.update()
        t_wrap = _median_time(lambda: model(tokens), repeats)
        bar.update()
        t_edit = _median_time(lambda: model.run_with_edits(tokens, [edit]), repeats)
        bar.update()
        out.results.append(CheckResult("time: hooked (no hooks attached) / plain HF", t_wrap / t_plain, None))
        out.results.append(CheckResult("time: one exact edit / clean hooked forward", t_edit / t_wrap, None))
    return out


def _check_resume_paths(model: HookedRecurrentModel, tokens: torch.Tensor, out: SelfCheck, bar=None) -> None:
    """The fast paths of ``substitute`` / ``patch`` / ``install`` against the full forward with the same edit, at
    every recurrent layer: a forward resumed at the layer (``run_from_layer``), a clean prefix cache continued
    from the edited position by a resumed forward (the substitution path), and a cache continued by the plain
    forward (decode / generation)."""
    b, T = tokens.shape
    pos = T // 2
    g = torch.Generator().manual_seed(1)
    for layer in model.cfg.recurrent_layers:
        edit = WriteEdit(layer=layer, pos=pos, head=0, batch=0, key=torch.randn(model.cfg.d_k, generator=g),
                         value=torch.randn(model.cfg.d_v, generator=g))
        full = model.run_with_edits(tokens, [edit])
        tol = 1e-5 * max(1.0, full.abs().max().item())  # relative to the logits' scale (fp32 step-wise decode)
        state = model.resume_state(tokens, layer)
        with model.edits([edit]):
            resumed = model.run_from_layer(state)
        detail = "" if not state.full else f"(falls back to the full forward: {state.fallback_reason})"
        out.results.append(CheckResult(f"layer {layer}: resumed forward + edit vs full forward",
                                       (resumed - full).abs().max().item(), tol, detail))
        prefix = model.cache_of(model(tokens[:1, :pos], return_type="hf", use_cache=True))
        with model.edits([edit]):
            cont = model.run_from_layer(state.select([0], start=pos), past_key_values=copy.deepcopy(prefix))
        out.results.append(CheckResult(f"layer {layer}: cached prefix + resumed suffix + edit vs full",
                                       (cont[0] - full[0, pos:]).abs().max().item(), tol))
        with model.edits([edit]):
            step = model(tokens[:1, pos:], past_key_values=prefix)
        out.results.append(CheckResult(f"layer {layer}: cached prefix + continued forward + edit vs full",
                                       (step[0] - full[0, pos:]).abs().max().item(), tol))
        if bar is not None:
            bar.update()
