"""Adapter cost as ratios measured in one run (not a timed test).

* plain HF forward vs the hooked model with no hooks attached, and with every GDN layer's factored write
  (hook_write_key + hook_write_value) captured;
* one exact edit (one extra kernel call per edited layer) vs a clean forward, and vs a naive edit that
  re-runs the layer with a Python per-token loop (the reference recurrence);
* peak size of any tensor created while capturing factors vs the dense write size.

Usage: python benchmarks/bench_adapter.py [--length 512] [--batch 4] [--repeats 7] [--hidden 256]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from writesae_plugin.adapters import WriteEdit, hook_model
from writesae_plugin.profiling import LargestTensor
from writesae_plugin.tiny import build_tiny_qwen35


def timeit_interleaved(fns: dict, repeats: int) -> dict:
    """Median seconds per function, calling them round-robin so drift hits all alike."""
    for fn in fns.values():
        fn()  # warm-up
    ts = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            ts[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in ts.items()}, ts


def naive_layer_read(q, k, v, g, beta, pos, head, A):
    """The edited layer by a per-token loop (vectorised over batch and heads), raw mode."""
    b, T, H, d_k = k.shape
    S = torch.zeros(b, H, d_k, v.shape[-1])
    out = torch.empty(b, T, H, v.shape[-1])
    for t in range(T):
        kt, bt = k[:, t], beta[:, t, :, None]
        S = g[:, t, :, None, None].exp() * (S - bt[..., None] * kt[..., None] * torch.einsum("bhk,bhkv->bhv", kt, S)[:, :, None])
        W = bt[..., None] * kt[..., None] * v[:, t, :, None]
        if t == pos:
            W = W.clone()
            W[0, head] = A
        S = S + W
        out[:, t] = torch.einsum("bhkv,bhk->bhv", S, q[:, t])
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--d-head", type=int, default=64)
    args = ap.parse_args()
    torch.manual_seed(0)
    hf = build_tiny_qwen35(tempfile.mkdtemp(), n_layers=4, d_head=args.d_head)
    model = hook_model(hf)
    cfg = model.cfg
    tokens = torch.randint(0, cfg.d_vocab, (args.batch, args.length))
    names = lambda n: n.endswith("hook_write_key") or n.endswith("hook_write_value")  # noqa: E731
    edit = WriteEdit(layer=1, pos=args.length // 2, head=0, batch=0, key=torch.randn(cfg.d_k),
                     value=torch.randn(cfg.d_v))
    rows = []
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.startswith("blocks.1."))
        p = "blocks.1.linear_attn."
        A = torch.outer(edit.key, edit.value)

        def naive_edit():  # the edited layer by a per-token loop, its read spliced into the model
            read = naive_layer_read(cache[p + "hook_query"], cache[p + "hook_write_key"], cache[p + "hook_v"],
                                    cache[p + "hook_log_decay"], cache[p + "hook_beta"], args.length // 2, 0, A)
            return model.run_with_hooks(tokens, fwd_hooks=[(p + "hook_read", lambda x, hook: read)])

        fast = model.run_with_edits(tokens, [edit])
        naive_err = (naive_edit() - fast).abs().max().item()
        med, _ = timeit_interleaved({
            "plain": lambda: hf(input_ids=tokens),
            "wrap": lambda: model(tokens),
            "capture": lambda: model.run_with_cache(tokens, names_filter=names),
            "edit": lambda: model.run_with_edits(tokens, [edit]),
            "naive": naive_edit,
        }, args.repeats)
        t_plain, t_wrap, t_cap, t_edit, t_naive = (med[k] for k in ("plain", "wrap", "capture", "edit", "naive"))
        mode = LargestTensor()
        with mode:
            model.run_with_cache(tokens, names_filter=names)
        dense = args.batch * args.length * cfg.n_heads * cfg.d_k * cfg.d_v
    rows.append(("hooked, no hooks attached / plain HF", t_wrap / t_plain))
    rows.append(("capture factored writes of all GDN layers / plain HF", t_cap / t_plain))
    rows.append(("one exact edit / clean hooked forward", t_edit / t_wrap))
    rows.append(("naive per-token-loop edit / exact edit", t_naive / t_edit))
    rows.append(("largest tensor while capturing factors / dense write size", mode.largest / dense))
    print(f"Qwen3.5 tiny: {len(cfg.recurrent_layers)} GDN layers, H={cfg.n_heads}, d_k=d_v={cfg.d_k}, "
          f"batch {args.batch} x {args.length} tokens, {torch.get_num_threads()} threads, median of "
          f"{args.repeats} interleaved rounds; plain forward {t_plain * 1e3:.1f} ms; naive vs exact edit logits "
          f"max |diff| {naive_err:.1e}")
    for name, r in rows:
        print(f"  {name:62s} {r:8.3f}")


if __name__ == "__main__":
    main()
