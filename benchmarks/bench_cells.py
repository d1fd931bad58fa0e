"""Many cells from one pass vs one run per cell (issue 13), as a ratio measured in one run.

On the shipped demo model (Gated DeltaNet, 4 value heads, d_k = d_v = 32), N write-site cells (every head of the
chosen layers) are trained two ways on the same contexts and the same SAE settings:

* **one at a time**: N streaming runs (``ActivationProvider`` + ``train_write_sae``), each running the model on
  every batch for its own cell;
* **together**: one extraction of all N cells (``store.extract``: one model forward per batch for every cell),
  then ``cells.train_cells`` from the store (the cells' SAE steps batched along a cell axis; ``--no-stack``:
  one cell after another).

Both read the same contexts: 2 for validation, the rest for training, every position of them once (the default
``--samples`` is all of them, so the extraction stores exactly what training reads).

Reported: wall seconds of each, training samples per second over all cells, the speed-up
``one-at-a-time / together`` against the target ``>= 0.7 N``, and the split of the together run (extraction vs
training). Run it on a quiet machine: other load inflates the forward share and the ratio with it. The order of the two is alternated over rounds
and the median taken. Sizes are small (a CPU box); the forward share grows with the model, so real models gain
more than this.

``--model wide`` runs the same comparison where real models are: the model forward, not the SAE step, dominates.
It is a random-init Qwen3.5 with the layer shapes of Qwen3.5-0.8B (hidden 1024, MLP 3584, 16 key and 16 value GDN
heads of d_k = d_v = 128, so a write cell is d_in = 16,384) and Qwen3.5's layer pattern (3 GDN + 1 attention,
repeated), saved and reloaded through ``from_pretrained``; the cells are the first ``--heads`` heads of ``--layers``
(default: 8 heads of layer 2). The forward runs only up to the last hooked layer in both arms, so the model is built
with ``--depth`` layers (default: the last hooked layer + 1; the layers after it would never run). Qwen3.5-0.8B has
24 layers: ``--layers 12`` is a mid-depth GDN layer of it (13 layers run before its writes are read).

Usage: python benchmarks/bench_cells.py [--model demo|wide] [--depth D] [--layers 2 4] [--heads 0 1 2 3] [--contexts 96]
       [--context-length 128] [--d-sae 256] [--k 16] [--batch 256] [--samples N] [--rounds 2] [--threads 2]
       [--no-stack]
"""

from __future__ import annotations

import argparse
import itertools
import shutil
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["demo", "wide"], default="demo",
                   help="demo: the shipped demo model; wide: random-init Qwen3.5 with Qwen3.5-0.8B's layer shapes")
    p.add_argument("--layers", type=int, nargs="+", default=None, help="default: 2 4 (demo), 2 (wide)")
    p.add_argument("--depth", type=int, default=None,
                   help="wide only: layers built (default: the last hooked layer + 1; Qwen3.5-0.8B has 24)")
    p.add_argument("--heads", type=int, nargs="+", default=None, help="default: every head (demo), 0-7 (wide)")
    p.add_argument("--contexts", type=int, default=None, help="default: 96 (demo), 24 (wide)")
    p.add_argument("--context-length", type=int, default=128)
    p.add_argument("--d-sae", type=int, default=256)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--samples", type=int, default=None,
                   help="training samples per cell (default: every position of the training contexts)")
    p.add_argument("--no-stack", action="store_true", help="train the cells one after another from the store")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from writesae_plugin.cells import Cell, CellTraining, cell_config, store_cells, train_cells
    from writesae_plugin.data import ActivationProvider, SiteSpec, token_contexts
    from writesae_plugin.demo import corpus
    from writesae_plugin.demo.run import load_demo_model
    from writesae_plugin.store import ActivationStore, ExtractConfig, extract
    from writesae_plugin.train import train_write_sae

    tmp = Path(tempfile.mkdtemp(prefix="bench-cells-"))
    if args.model == "wide":
        args.layers = args.layers or [2]
        depth = args.depth or max(args.layers) + 1
        if depth <= max(args.layers):
            p.error(f"--depth {depth} has no layer {max(args.layers)}: expected a depth above the last hooked layer")
        model = _wide_model(tmp / "wide", depth)
        bad = [l for l in args.layers if l not in model.cfg.recurrent_layers]
        if bad:
            p.error(f"--layers {bad} are attention layers of the wide model (every 4th layer): pick GDN layers")
        heads = args.heads or list(range(8))
        args.contexts = args.contexts or 24
    else:
        model = load_demo_model()
        args.layers = args.layers or [2, 4]
        heads = args.heads or list(range(model.cfg.n_heads))
        args.contexts = args.contexts or 96
    T = args.context_length
    contexts = list(itertools.islice(token_contexts(corpus.texts("train"), model.tokenizer, T), args.contexts))
    n_cells = len(args.layers) * len(heads)
    if args.samples is None:
        args.samples = (args.contexts - 2) * T // args.batch * args.batch
    t = CellTraining(d_sae=args.d_sae, k=args.k, aux_k=2 * args.k, total_samples=args.samples,
                     batch_size=args.batch, lr=2e-3, val_contexts=2, val_every=10 ** 9, n_checkpoints=0)

    split = {"extract": [], "train": [], "single runs": []}

    def together() -> float:
        shutil.rmtree(tmp / "together", ignore_errors=True)
        start = time.perf_counter()
        cfg = ExtractConfig(layers=args.layers, heads=heads, site="write", contexts_per_shard=32, forward_batch=8)
        store = ActivationStore(extract(model, iter(contexts), tmp / "together" / "store", cfg, progress=False))
        mid = time.perf_counter()
        train_cells(store, store_cells(store, args.layers, heads, "write"), tmp / "together" / "out", t,
                    progress=False, stack=not args.no_stack)
        end = time.perf_counter()
        split["extract"].append(mid - start)
        split["train"].append(end - mid)
        return end - start

    def one_at_a_time() -> float:
        shutil.rmtree(tmp / "single", ignore_errors=True)
        start = time.perf_counter()
        for layer in args.layers:
            for head in heads:
                run_start = time.perf_counter()
                spec = SiteSpec(layer=layer, site="write", heads=[head], positions="all", layout="factors")
                provider = ActivationProvider(model, iter(contexts[2:]), spec, batch_size=args.batch,
                                              normalize=True, first_context=2)
                val = list(ActivationProvider(model, iter(contexts[:2]), spec, batch_size=args.batch,
                                              buffer_batches=2, seed=1, position_seed=0))
                store_like = _StoreInfo(model)
                cfg = cell_config(store_like, Cell(layer, head, "write"), t)
                torch.manual_seed(0)
                train_write_sae(cfg, provider, tmp / "single" / f"L{layer}.H{head}", total_samples=args.samples,
                                batch_size=args.batch, lr=t.lr, val_batches=val, val_every=t.val_every,
                                n_checkpoints=0)
                split["single runs"].append(time.perf_counter() - run_start)
        return time.perf_counter() - start

    # warm-up, untimed: the first forward of a freshly loaded model pages its weights in (safetensors are mapped
    # lazily; 1.1 GB at --model wide --depth 13) and sizes the allocator; timed, it lands on whichever arm runs first
    with torch.no_grad():
        for i in range(0, len(contexts), 8):
            model(torch.stack(contexts[i:i + 8]), stop_at_layer=max(args.layers) + 1)
    times = {"together": [], "one at a time": []}
    for r in range(args.rounds):
        order = [("together", together), ("one at a time", one_at_a_time)]
        for name, fn in (order if r % 2 == 0 else order[::-1]):
            times[name].append(fn())
    med = {k: statistics.median(v) for k, v in times.items()}
    total = n_cells * args.samples
    d = model.cfg
    print(f"model {args.model} ({d.n_layers} layers, d_k {d.d_k}, d_v {d.d_v}, {sum(p.numel() for p in model.hf_model.parameters()) / 1e6:.0f}M "
          f"parameters), {n_cells} cells (layers {args.layers} x heads {heads}), {args.samples} samples each, d_sae {args.d_sae}, "
          f"k {args.k}, batch {args.batch}, {args.contexts} contexts of {T}, {args.threads} threads, "
          f"{args.rounds} rounds (median), {'one cell after another' if args.no_stack else 'stacked cells'}")
    for name, v in med.items():
        print(f"  {name:14s} {v:8.1f} s  {total / v:9.0f} samples/s   (rounds: {', '.join(f'{x:.1f}' for x in times[name])})")
    speedup = med["one at a time"] / med["together"]
    F, S_all = statistics.median(split["extract"]), statistics.median(split["train"])
    print(f"  together = extraction {F:.1f} s (the one shared forward) + training {S_all:.1f} s (all cells)")
    runs = split["single runs"]
    print(f"  one at a time: one streaming run (forward + SAE) {statistics.median(runs):.1f} s median "
          f"({min(runs):.1f}-{max(runs):.1f} s over {len(runs)} runs)")
    print(f"  speed-up {speedup:.2f}x = {speedup / n_cells:.2f} N (target >= 0.7 N)")
    shutil.rmtree(tmp, ignore_errors=True)


def _wide_model(path: Path, depth: int):
    """Random-init Qwen3.5 with Qwen3.5-0.8B's layer shapes and pattern (3 GDN + 1 attention, repeated) and ``depth``
    layers, saved and reloaded (the demo tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen3_5ForCausalLM, Qwen3_5TextConfig

    from writesae_plugin.adapters import hook_model
    from writesae_plugin.demo.run import demo_model_dir

    tok = AutoTokenizer.from_pretrained(demo_model_dir())
    cfg = Qwen3_5TextConfig(vocab_size=len(tok), hidden_size=1024, intermediate_size=3584, num_hidden_layers=depth,
                            layer_types=[("full" if i % 4 == 3 else "linear") + "_attention" for i in range(depth)],
                            num_attention_heads=8,
                            num_key_value_heads=2, head_dim=256, linear_num_key_heads=16, linear_num_value_heads=16,
                            linear_key_head_dim=128, linear_value_head_dim=128, max_position_embeddings=4096,
                            tie_word_embeddings=True)
    torch.manual_seed(0)
    Qwen3_5ForCausalLM(cfg).save_pretrained(path)
    return hook_model(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), tokenizer=tok)


class _StoreInfo:
    """What ``cell_config`` reads of a store, from a hooked model (for the streaming runs)."""

    def __init__(self, model):
        from writesae_plugin.store import model_info

        self.model = model_info(model)
        self.config = {"data": {"context_length": None}}


if __name__ == "__main__":
    main()
