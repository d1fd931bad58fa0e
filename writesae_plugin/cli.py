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
    print("hook inventory (layer 0 shown; every recurrent layer has the same hooks):")
    first = model.cfg.recurrent_layers[0]
    for name, desc in model.hook_inventory():
        if name.startswith(f"blocks.{first}."):
            print(f"  {name:42s} {desc}")
    tokens = torch.randint(0, model.cfg.d_vocab, (args.batch, args.length))
    print(f"\nself-check on random tokens [{args.batch}, {args.length}]:")
    result = run_selfcheck(model, tokens)
    print(result.table())
    print("\nall checks passed" if result.ok else "\nSOME CHECKS FAILED")
    return 0 if result.ok else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="writesae", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("hooks", help="hook a model, print its write hook inventory and run the exactness self-check")
    p.add_argument("--model", default=None, help="local HF model dir or hub id (default: a tiny built-in Qwen3.5)")
    p.add_argument("--length", type=int, default=150, help="tokens per sequence (default 150, not a multiple of 64)")
    p.add_argument("--batch", type=int, default=2, help="sequences (default 2)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_hooks)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "length", 2) < 2:
        print("writesae: --length must be at least 2", file=sys.stderr)
        return 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
