"""The ``writesae`` command."""

from __future__ import annotations

import argparse
import sys
import tempfile


def _load(model_path: str | None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .adapters import hook_model
    from .tiny import build_tiny_qwen35

    if model_path is None:
        tmp = tempfile.mkdtemp(prefix="writesae-tiny-")
        return hook_model(build_tiny_qwen35(tmp)), "tiny random-init Qwen3.5 (built and reloaded from " + tmp + ")"
    hf = AutoModelForCausalLM.from_pretrained(model_path)
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
    for name, desc in model.hook_inventory():
        if name.startswith(f"blocks.{first}."):
            print(f"  {name:42s} {desc}")
    tokens = torch.randint(0, model.cfg.d_vocab, (args.batch, args.length))
    print(f"\nself-check on random tokens [{args.batch}, {args.length}]:")
    result = run_selfcheck(model, tokens)
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


def cmd_train(args) -> int:
    import itertools
    import json

    from .checkpoints import CheckpointError, OutputDirError, check_identity, prepare_output

    layout = args.layout
    if layout == "auto":
        layout = "factors" if args.site == "write" and args.encoder == "bilinear" else "dense"
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
        print(f"writesae train: {e}", file=sys.stderr)
        return 2

    import torch

    from .data import ActivationProvider, SiteSpec, load_text_dataset, token_contexts
    from .sae import WriteSAETrainingConfig
    from .train import train_write_sae

    torch.manual_seed(args.seed)
    model, desc = _load(args.model)
    if model.tokenizer is None:
        print(f"writesae train: {desc} has no tokenizer; a text dataset needs one", file=sys.stderr)
        return 2
    cfg_m = model.cfg
    if args.layer not in cfg_m.recurrent_layers:
        print(f"writesae train: --layer {args.layer} is not a recurrent layer; choose from "
              f"{list(cfg_m.recurrent_layers)}", file=sys.stderr)
        return 2
    if args.head is not None and not 0 <= args.head < cfg_m.n_heads:
        print(f"writesae train: --head {args.head} out of range (0..{cfg_m.n_heads - 1} or all)", file=sys.stderr)
        return 2
    ds = load_text_dataset(args.dataset, text_column=args.text_column)
    texts = (row[args.text_column] for row in ds)
    contexts = token_contexts(texts, model.tokenizer, args.context_length)
    val_contexts = list(itertools.islice(contexts, args.val_contexts))
    if len(val_contexts) < args.val_contexts:
        print("writesae train: the dataset is too small for the validation split", file=sys.stderr)
        return 2
    heads = None if args.head is None else [args.head]
    spec = SiteSpec(layer=args.layer, site=args.site, heads=heads, positions=args.positions,
                    write_mode=args.write_mode, layout=layout)
    provider = ActivationProvider(model, contexts, spec, batch_size=args.batch_size, seed=args.seed,
                                  normalize=not args.no_normalize)
    val_provider = ActivationProvider(model, iter(val_contexts), spec, batch_size=args.batch_size,
                                      buffer_batches=2, seed=args.seed + 1)
    val_batches = list(val_provider)
    hook = model.hook_prefix(args.layer) + f"hook_{args.site}"
    cfg = WriteSAETrainingConfig(
        d_in=cfg_m.d_k * cfg_m.d_v, d_sae=args.d_sae, d_k=cfg_m.d_k, d_v=cfg_m.d_v, k=args.k,
        encoder=args.encoder, decoder_rank=None if args.decoder_rank == 0 else args.decoder_rank,
        activation=args.activation, site=args.site, head=args.head, n_heads=cfg_m.n_heads, family=cfg_m.family,
        layer=args.layer, hook_name_hf=model.family.hf_module_name(model.hf_model, args.layer),
        write_mode=args.write_mode, input_layout=layout, aux_k=min(args.aux_k, args.d_sae),
        resample_every=args.resample_every)
    cfg.metadata.hook_name = hook
    cfg.metadata.model_name = desc
    cfg.metadata.context_size = args.context_length
    cfg.metadata.prepend_bos = False
    try:
        sae, history = train_write_sae(cfg, provider, args.out, total_samples=args.total_samples,
                                       batch_size=args.batch_size, lr=args.lr, val_batches=val_batches,
                                       val_every=args.val_every, resume_from=ckpt)
    except (CheckpointError, OutputDirError) as e:  # another model or data than the checkpoint's; a failed write
        print(f"writesae train: {e}", file=sys.stderr)
        return 2
    last = history[-1] if history else {}
    print(json.dumps({"out": str(args.out), "final_validation": last}, indent=2))
    print(f"load with: SAE.load_from_disk({str(args.out) + '/final'!r})")
    return 0


def _load_sae(spec: str):
    """``DIR`` (SAE.load_from_disk) or ``RELEASE:SAE_ID`` (SAE.from_pretrained, offline releases)."""
    from pathlib import Path

    from sae_lens import SAE

    from .registry import load_release_sae

    if Path(spec).is_dir():
        return SAE.load_from_disk(spec)
    if ":" in spec:
        release, sae_id = spec.split(":", 1)
        return load_release_sae(release, sae_id)
    raise SystemExit(f"writesae: --sae must be an SAE directory or RELEASE:SAE_ID, got {spec!r}")


def _contexts(model, args):
    import itertools

    import torch

    from .data import load_text_dataset, token_contexts

    if model.tokenizer is None:
        raise SystemExit("writesae: the model has no tokenizer; a text dataset needs one")
    ds = load_text_dataset(args.dataset, text_column=args.text_column)
    ctx = list(itertools.islice(token_contexts((r[args.text_column] for r in ds), model.tokenizer,
                                               args.context_length), args.contexts))
    if not ctx:
        raise SystemExit("writesae: the dataset yields no context of the requested length")
    return torch.stack(ctx)


def _experiment_inputs(args, with_sae: bool = True):
    """(hooked model, its description, the SAE or None, token contexts) from the common arguments."""
    model, desc = _load(args.model)
    sae = _load_sae(args.sae) if with_sae else None
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
    print(f"  per-atom mean (atoms with >= 5 firings): {json.dumps(by.get('atom_act', {}).get('per_atom_mean'))}")
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
    from .experiments.install import InstallConfig, run_install, save_install
    from .report import fmt_rate

    model, desc, _, tokens = _experiment_inputs(args, with_sae=False)
    strata = tuple(tuple(int(x) for x in s.split("-")) for s in args.strata)
    cfg = InstallConfig(layer=args.layer, head=args.head, strata=strata, targets_per_stratum=args.targets,
                        multipliers=tuple(args.m), n_positions=args.n_positions, mode=args.mode,
                        max_new_tokens=args.new_tokens, seed=args.seed)
    res = run_install(model, tokens, cfg)
    index = save_install(res, args.out, {"model": desc})
    for m, block in res.summary["by_multiplier"].items():
        for key, v in block.items():
            print(f"  m={m} {key:14s} installed {fmt_rate(v['installed_rate'])}  baseline {fmt_rate(v['baseline_rate'])}"
                  f"  log-prob lift {v['mean_logprob_lift']:+.3f}")
    print(f"  paper: ranks 100-1000, 33.3% -> 100% (about 60 independent pairs)\nreport: {index}")
    return 0


def cmd_attribute(args) -> int:
    import numpy as np
    import torch

    from .experiments.write_attribution import ErasureConfig, effective_attention, run_erasure
    from .report import plt, write_report

    model, desc, sae, tokens = _experiment_inputs(args)
    er = run_erasure(model, sae, tokens, ErasureConfig(atoms=args.atoms, max_per_atom=args.max_per_atom,
                                                         seed=args.seed))
    p = model.hook_prefix(sae.cfg.layer)
    with torch.no_grad():
        _, c = model.run_with_cache(tokens[:1], names_filter=lambda n: n.startswith(p))
    A = effective_attention(c[p + "hook_query"], c[p + "hook_write_key"], c[p + "hook_log_decay"],
                            c[p + "hook_beta"])[0, sae.cfg.head]

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

    meta = make_demo_release(args.model, args.out)
    for sid in meta["saes"]:
        print(f"  {sid}: FVU {meta['expected_fvu'][sid]:.3f}  L0 {meta['expected_l0'][sid]:.1f}  "
              f"dead {meta['dead_fraction'][sid]:.2f}")
    return 0


def cmd_demo(args) -> int:
    from .demo.run import QUICK, DemoSize, run_demo, run_demo_all, summary_table

    size = QUICK if args.quick else DemoSize()
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
    from .demo.run import demo_model_dir

    model, _ = _load(args.model or str(demo_model_dir()))
    if model.tokenizer is None:
        raise SystemExit("writesae: the model has no tokenizer; the copy task needs one")
    specs = args.sae or list(DEFAULT_SAES[:n_saes])
    saes = [_load_sae(s) for s in specs]
    if args.dataset:
        from .data import load_text_dataset

        texts = (r[args.text_column] for r in load_text_dataset(args.dataset, text_column=args.text_column))
    else:
        texts = corpus.texts("test")
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
    res = run_circuit(model, saes, pairs, args.out, args.node_threshold, args.edge_threshold, args.acdc_threshold)
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


def _add_pairs_args(p, sae_help: str):
    p.add_argument("--model", default=None, help="HF model directory (default: the shipped demo model)")
    p.add_argument("--sae", action="append", default=None, help=sae_help)
    p.add_argument("--dataset", default=None, help="text file/dir for the prompts (default: held-out stdlib)")
    p.add_argument("--text-column", default="text")
    p.add_argument("--task", choices=["quote", "copy"], default="quote",
                   help="quote: ' vs \" opening a string, metric logit(') - logit(\") (default); copy: induction")
    p.add_argument("--n", type=int, default=16, help="number of clean/corrupted prompt pairs")
    p.add_argument("--length", type=int, default=24, help="prompt length in tokens")
    p.add_argument("--source-pos", type=int, default=8, help="copy task: the corrupted position")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="results directory")


def _add_data_args(p):
    p.add_argument("--dataset", required=True, help="hub dataset name, or a local .txt/.jsonl/.parquet file or dir")
    p.add_argument("--text-column", default="text")
    p.add_argument("--contexts", type=int, default=32, help="number of token contexts")
    p.add_argument("--context-length", type=int, default=128)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="writesae", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("hooks", help="hook a model, print its write hook inventory and run the exactness self-check")
    p.add_argument("--model", default=None, help="local HF model dir or hub id (default: a tiny built-in Qwen3.5)")
    p.add_argument("--length", type=int, default=150, help="tokens per sequence (default 150, not a multiple of 64)")
    p.add_argument("--batch", type=int, default=2, help="sequences (default 2)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_hooks)

    t = sub.add_parser("train", help="train a WriteSAE on a layer/head's write or state site")
    t.add_argument("--model", default=None, help="hub id or local HF model dir (default: tiny built-in Qwen3.5)")
    t.add_argument("--layer", type=int, required=True, help="a recurrent (Gated DeltaNet) layer index")
    t.add_argument("--head", type=_head, default=None, help="value head index, or 'all' (one shared dictionary)")
    t.add_argument("--site", choices=["state", "write"], default="state")
    t.add_argument("--dataset", required=True, help="hub dataset name, or a local .txt/.jsonl/.parquet file or dir")
    t.add_argument("--text-column", default="text")
    t.add_argument("--out", required=True, help="output directory (final/ loads with SAE.load_from_disk)")
    t.add_argument("--d-sae", type=int, default=2048, help="atoms (paper: 2048)")
    t.add_argument("--k", type=int, default=32, help="active atoms per sample (paper: 32)")
    t.add_argument("--encoder", choices=["bilinear", "dense"], default="bilinear")
    t.add_argument("--decoder-rank", type=int, default=1, help="rank of each atom; 0 = dense decoder (FlatSAE)")
    t.add_argument("--activation", choices=["topk", "batchtopk", "jumprelu"], default="topk")
    t.add_argument("--write-mode", choices=["raw", "delta"], default="raw")
    t.add_argument("--layout", choices=["auto", "dense", "factors"], default="auto",
                   help="auto: factors for the write site with a bilinear encoder")
    t.add_argument("--positions", type=_positions, default="all", help="all, last, stride:N or random:N")
    t.add_argument("--context-length", type=int, default=128)
    t.add_argument("--total-samples", type=int, default=256 * 2000)
    t.add_argument("--batch-size", type=int, default=256)
    t.add_argument("--lr", type=float, default=3e-4)
    t.add_argument("--aux-k", type=int, default=256)
    t.add_argument("--resample-every", type=int, default=0, help="resample dead atoms every N steps (0: off)")
    t.add_argument("--val-contexts", type=int, default=16)
    t.add_argument("--val-every", type=int, default=100)
    t.add_argument("--no-normalize", action="store_true", help="do not rescale inputs to mean norm sqrt(d_in)")
    t.add_argument("--resume", default=None,
                   help="a checkpoint directory to resume from, or 'latest' (the newest complete one under "
                        "OUT/checkpoints); the run continues its data stream where the checkpoint left it")
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(func=cmd_train)

    s = sub.add_parser("substitute", help="substitution test: replace writes by atoms vs deleting them")
    s.add_argument("--model", default=None, help="local HF model dir or hub id")
    s.add_argument("--sae", required=True, help="SAE directory or RELEASE:SAE_ID (a per-head WriteSAE)")
    _add_data_args(s)
    s.add_argument("--out", required=True, help="results directory")
    s.add_argument("--atoms", type=int, nargs="*", default=None, help="atom pool (default: all)")
    s.add_argument("--max-per-atom", type=int, default=50)
    s.add_argument("--max-per-context", type=int, default=4)
    s.add_argument("--max-firings", type=int, default=500)
    s.add_argument("--write-mode", choices=["raw", "delta"], default=None, help="default: the SAE's")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_substitute)

    c = sub.add_parser("closed-form", help="closed-form logit shift: JVP, direct path and fitted-G predictors")
    c.add_argument("--model", default=None)
    c.add_argument("--sae", required=True)
    _add_data_args(c)
    c.add_argument("--out", required=True)
    c.add_argument("--atoms", type=int, nargs="+", default=[0])
    c.add_argument("--t0", type=int, default=None, help="perturbed position (default T // 4)")
    c.add_argument("--eps", type=float, nargs="+", default=[0.05, 0.25, 1.0], help="x native write norm")
    c.add_argument("--n-tokens", type=int, default=5)
    c.add_argument("--fit-fraction", type=float, default=0.5)
    c.add_argument("--seed", type=int, default=0)
    c.set_defaults(func=cmd_closed_form)

    i = sub.add_parser("install", help="behavioural install: steer greedy continuations towards target tokens")
    i.add_argument("--model", default=None)
    _add_data_args(i)
    i.add_argument("--out", required=True)
    i.add_argument("--layer", type=int, required=True)
    i.add_argument("--head", type=int, required=True)
    i.add_argument("--strata", nargs="+", default=["10-50", "50-200"], help="initial-rank ranges LO-HI")
    i.add_argument("--targets", type=int, default=2, help="targets per stratum and prompt")
    i.add_argument("--m", type=float, nargs="+", default=[3.0], help="install size(s) x native write norm")
    i.add_argument("--n-positions", type=int, default=3)
    i.add_argument("--mode", choices=["replace", "add"], default="replace")
    i.add_argument("--new-tokens", type=int, default=20)
    i.add_argument("--seed", type=int, default=0)
    i.set_defaults(func=cmd_install)

    a = sub.add_parser("attribute", help="write attribution (effective attention) and atom erasure")
    a.add_argument("--model", default=None)
    a.add_argument("--sae", required=True)
    _add_data_args(a)
    a.add_argument("--out", required=True)
    a.add_argument("--atoms", type=int, nargs="+", default=[0])
    a.add_argument("--max-per-atom", type=int, default=20)
    a.add_argument("--seed", type=int, default=0)
    a.set_defaults(func=cmd_attribute)

    mk = sub.add_parser("make-demo-model", help="train the shipped demo model on the Python stdlib (reproducible)")
    mk.add_argument("--out", required=True)
    mk.add_argument("--arch", choices=["qwen3_5", "mamba2"], default="qwen3_5",
                    help="qwen3_5: the Gated DeltaNet demo; mamba2: the Mamba-2 demo")
    mk.add_argument("--tokenizer", default=None,
                    help="reuse this tokenizer directory (default for mamba2: the shipped GDN demo's tokenizer)")
    mk.add_argument("--steps", type=int, default=900)
    mk.add_argument("--seed", type=int, default=0)
    mk.set_defaults(func=cmd_make_demo_model)

    mr = sub.add_parser("make-demo-release", help="train the shipped WriteSAE release for the demo model")
    mr.add_argument("--model", required=True, help="the demo model directory")
    mr.add_argument("--out", required=True)
    mr.set_defaults(func=cmd_make_demo_release)

    pp = sub.add_parser("patch", help="activation patching of every write and of WriteSAE atoms")
    _add_pairs_args(pp, "DIR or RELEASE:SAE_ID (default writesae-demo:L4.H0.write)")
    pp.set_defaults(func=cmd_patch)
    ap = sub.add_parser("attribution-patch", help="attribution patching vs actual patching (writes, atoms)")
    _add_pairs_args(ap, "DIR or RELEASE:SAE_ID (default writesae-demo:L4.H0.write)")
    ap.set_defaults(func=cmd_attribution_patch)
    pa = sub.add_parser("path-patch", help="path patching of one write through chosen reads / later layers")
    _add_pairs_args(pa, "unused")
    pa.add_argument("--layer", type=int, default=None, help="sender layer (default: largest patching effect)")
    pa.add_argument("--head", type=int, default=None)
    pa.set_defaults(func=cmd_path_patch)
    ci = sub.add_parser("circuit", help="sparse feature circuit over write atoms + ACDC pruning (JSON, figures)")
    _add_pairs_args(ci, "repeatable; in upstream-to-downstream order (default: the demo write and state SAEs)")
    ci.add_argument("--node-threshold", type=float, default=0.02)
    ci.add_argument("--edge-threshold", type=float, default=0.01)
    ci.add_argument("--acdc-threshold", type=float, default=0.02)
    ci.set_defaults(func=cmd_circuit)
    ea = sub.add_parser("edit-atoms", help="SHIFT-style ablation of atoms vs random-atom controls")
    _add_pairs_args(ea, "DIR or RELEASE:SAE_ID (default writesae-demo:L4.H0.write)")
    ea.add_argument("--atoms", type=int, nargs="+", default=None, help="default: the top-3 by attribution")
    ea.add_argument("--controls", type=int, default=20)
    ea.set_defaults(func=cmd_edit_atoms)

    d = sub.add_parser("demo", help="the shipped model and SAEs through the substitution, closed-form and install "
                                    "tests on held-out text (the main job)")
    d.add_argument("--out", default="writesae_results/demo", help="results directory")
    d.add_argument("--arch", choices=["all", "qwen3_5", "mamba2"], default="all",
                   help="all (default): both shipped models and the cross-architecture comparison; or just one")
    d.add_argument("--quick", action="store_true", help="a reduced size (for tests)")
    d.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "length", 2) < 2:
        print("writesae: --length must be at least 2", file=sys.stderr)
        return 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
