"""Activation patching of writes: the batched, resumed ``patch_writes`` vs the naive loop of one full forward
per patch (``run_with_edits``), and attribution patching (one forward + backward) vs both, as ratios in one
run on the shipped demo model (copy-task pairs from held-out text). Agreement is checked, not assumed.

Usage: python benchmarks/bench_patching.py [--n 4] [--length 32] [--layer 2] [--repeats 3]
       python benchmarks/bench_patching.py --circuit [--n 16] [--length 24] [--batch-size 1]
           (``writesae circuit``'s defaults: the demo write + state SAEs at layer 4, quote task; time and peak
           RSS of each stage, one run)
       python benchmarks/bench_patching.py --ops   (the adapter's state paths: per-token scan vs kernel, with
           their agreement, at the circuit's size and longer; d_k = d_v = 64, 4 heads; the kernel path of
           propagated_states takes minutes beyond these sizes; fastest of --repeats)
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import writesae_plugin  # noqa: F401
from writesae_plugin.adapters import WriteEdit
from writesae_plugin.circuits import attribute_writes, compare_with_patching, patch_writes
from writesae_plugin.circuits.tasks import copy_task
from writesae_plugin.demo import corpus
from writesae_plugin.demo.run import load_demo_model


def naive(model, pairs, metric, layer):
    p = model.hook_prefix(layer)
    with torch.no_grad():
        _, c = model.run_with_cache(pairs.clean, names_filter=[p + "hook_write_key", p + "hook_write_value"])
        out = torch.zeros(pairs.clean.shape[1], model.cfg.n_heads)
        for t in range(pairs.clean.shape[1]):
            for h in range(model.cfg.n_heads):
                edits = [WriteEdit(layer=layer, pos=t, head=h, key=c[p + "hook_write_key"][b, t, h],
                                   value=c[p + "hook_write_value"][b, t, h], batch=b) for b in range(len(pairs))]
                out[t, h] = float(metric(model.run_with_edits(pairs.corrupted, edits)))
    return out


def timed(fn, repeats):
    times, res = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        res = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), res


def circuit(args):
    """Time and peak RSS of each stage of ``run_circuit``'s work (feature circuit, ACDC) at the CLI defaults."""
    import resource

    from writesae_plugin.circuits.feature_circuits import acdc_prune, feature_circuit
    from writesae_plugin.circuits.run import DEFAULT_SAES
    from writesae_plugin.circuits.tasks import quote_task
    from writesae_plugin.registry import load_release_sae

    def rss_gb():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6

    def cpu_s():  # CPU time of this process: less sensitive than wall time to other jobs on a shared machine
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    model = load_demo_model()
    saes = [load_release_sae(*s.split(":")) for s in DEFAULT_SAES]
    pairs = quote_task(model.tokenizer, corpus.texts("test"), args.n, args.length, seed=0)
    metric = pairs.metric()
    print(f"demo GDN model, {', '.join(DEFAULT_SAES)}, quote task {args.n} pairs x {args.length} tokens, "
          f"batch_size {args.batch_size}; peak RSS before: {rss_gb():.2f} GB")
    t, c = time.perf_counter(), cpu_s()
    circ = feature_circuit(model, saes, pairs.clean, pairs.corrupted, metric, 0.02, 0.01,
                           batch_size=args.batch_size)
    print(f"feature circuit: {time.perf_counter() - t:.1f} s ({cpu_s() - c:.1f} s CPU), {len(circ.nodes)} nodes, "
          f"{len(circ.edges)} edges; peak RSS {rss_gb():.2f} GB", flush=True)
    t, c = time.perf_counter(), cpu_s()
    pruned = acdc_prune(model, saes, pairs.clean, pairs.corrupted, metric, 0.02, circuit=circ)
    print(f"ACDC: {time.perf_counter() - t:.1f} s ({cpu_s() - c:.1f} s CPU), {len(pruned.nodes)} nodes, faithfulness "
          f"{pruned.metric['faithfulness']:.3f}; peak RSS {rss_gb():.2f} GB")


def state_paths(args):
    """Time of ``ops.states_at``, ``ops.propagated_states`` (every (row, position) perturbed, as with a state SAE
    under autograd) and ``ops.propagate`` (the same perturbations): per-token scan vs the kernel path, fastest of
    ``--repeats`` after a warm-up call (the minimum: the development machine is shared)."""
    import inspect

    import transformers.models.qwen3_5.modeling_qwen3_5 as mq

    from writesae_plugin.adapters import ops

    kernel = inspect.unwrap(mq.torch_chunk_gated_delta_rule)
    H, dk = 4, 64
    print(f"{'call':<20} {'b x T':>8} {'kernel s':>9} {'scan s':>8} {'ratio':>6} {'max rel diff':>12}")
    fastest = lambda fn: min(timed(fn, 1)[0] for _ in range(args.repeats))  # noqa: E731  (shared machine)
    for b, T in ((1, 24), (2, 48)):
        gen = torch.Generator().manual_seed(0)
        k = torch.nn.functional.normalize(torch.randn(b, T, H, dk, generator=gen), dim=-1)
        v, q = torch.randn(b, T, H, dk, generator=gen), torch.randn(b, T, H, dk, generator=gen)
        g, beta = -torch.rand(b, T, H, generator=gen), torch.rand(b, T, H, generator=gen)
        rows = torch.ones(b, T, dtype=torch.bool).nonzero()
        pert = ops.Perturbations(rows[:, 0], rows[:, 1], 0.1 * torch.randn(b * T, H, dk, dk, generator=gen))
        positions = torch.arange(T)
        calls = {
            "states_at": lambda m: ops.states_at(kernel, k, v, g, beta, None, T, method=m),
            "propagated_states": lambda m: ops.propagated_states(kernel, pert, k, g, beta, positions, b, method=m),
            "propagate": lambda m: ops.propagate(kernel, pert, q, q * dk ** -0.5, k, g, beta, method=m).delta_read,
        }
        for name, fn in calls.items():
            ref, got = fn("kernel"), fn("scan")  # warm-up, and the agreement
            t_k, t_s = fastest(lambda: fn("kernel")), fastest(lambda: fn("scan"))
            rel = float((got - ref).abs().max() / ref.abs().max())
            print(f"{name:<20} {f'{b}x{T}':>8} {t_k:9.3f} {t_s:8.3f} {t_k / t_s:5.1f}x {rel:12.1e}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--circuit", action="store_true", help="measure the circuit command's stages instead")
    ap.add_argument("--ops", action="store_true", help="time the adapter's state paths (scan vs kernel) instead")
    ap.add_argument("--batch-size", type=int, default=1, help="--circuit: prompts per gradient pass (0: all)")
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--length", type=int, default=32)
    ap.add_argument("--layer", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(2)
    if args.ops:
        return state_paths(args)
    if args.circuit:
        args.batch_size = args.batch_size or None
        return circuit(args)
    model = load_demo_model()
    pairs = copy_task(model.tokenizer, corpus.texts("test"), args.n, args.length, source_pos=8)
    metric = pairs.metric()
    t_fast, fast = timed(lambda: patch_writes(model, pairs.clean, pairs.corrupted, metric, layers=[args.layer],
                                              progress=False), args.repeats)
    t_naive, slow = timed(lambda: naive(model, pairs, metric, args.layer), args.repeats)
    t_atp, est = timed(lambda: attribute_writes(model, pairs.clean, pairs.corrupted, metric, layers=[args.layer]),
                       args.repeats)
    diff = float((fast.scores[0] - slow).abs().max())
    cmp = compare_with_patching(est, fast)
    print(f"demo GDN model, layer {args.layer}, {args.n} pairs x {args.length} tokens, "
          f"{args.length * model.cfg.n_heads} patches, median of {args.repeats}")
    print(f"patch_writes (batched, resumed, no-op patches skipped): {t_fast:.2f} s")
    print(f"naive loop of full forwards: {t_naive:.2f} s  -> speed-up {t_naive / t_fast:.2f}x, max |diff| {diff:.2e}")
    print(f"attribution patching: {t_atp:.2f} s  -> {t_fast / t_atp:.1f}x faster than patch_writes; "
          f"pearson {cmp.get('pearson', float('nan')):.3f} with actual patching (n = {cmp['n']})")


if __name__ == "__main__":
    main()
