"""Dead-atom resampling on / off on the shipped demo models (issue 13: is it worth being the default?).

For each demo model's release cell (the release recipe: d_sae 512, k 16, aux-k 128, lr 2e-3; the stdlib train
split, validated on the release's held-out contexts), trains the state and the write SAE twice with the same seed
and data, ``resample_every`` = 0 and = R, for ``--scale`` x the release's sample budget, and prints the held-out
FVU, L0 and dead fraction of each. Not a timed test; run it by hand:

    python benchmarks/bench_resample.py --scale 0.25 --every 200
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch


def run(arch: str, site: str, every: int, scale: float, seed: int = 0) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from writesae_plugin.adapters import hook_model
    from writesae_plugin.data import ActivationProvider, SiteSpec
    from writesae_plugin.demo.release import _contexts, release_recipe
    from writesae_plugin.demo.run import demo_model_dir
    from writesae_plugin.sae import WriteSAETrainingConfig
    from writesae_plugin.train import evaluate_sae, train_write_sae

    path = demo_model_dir(arch=arch)
    model = hook_model(AutoModelForCausalLM.from_pretrained(path).eval(), tokenizer=AutoTokenizer.from_pretrained(path))
    r = release_recipe(arch)
    layer, head = r.layer, r.head
    m = model.cfg
    layout = "factors" if site == "write" else "dense"
    spec = SiteSpec(layer=layer, site=site, heads=[head], positions=("stride", 4) if site == "state" else "all",
                    layout=layout)
    batch = r.batch_state if site == "state" else r.batch_write
    samples = int((r.state_samples if site == "state" else r.write_samples) * scale) // batch * batch
    evals = torch.stack(list(_contexts(model.tokenizer, "validation", r.context_length, r.eval_contexts)))
    val = list(ActivationProvider(model, iter(evals), SiteSpec(layer=layer, site=site, heads=[head], layout=layout),
                                  batch_size=512, buffer_batches=2, seed=seed + 1))
    torch.manual_seed(seed)
    provider = ActivationProvider(model, _contexts(model.tokenizer, "train", r.context_length), spec,
                                  batch_size=batch, buffer_batches=8, seed=seed, normalize=True)
    cfg = WriteSAETrainingConfig(d_in=m.d_k * m.d_v, d_sae=r.d_sae, d_k=m.d_k, d_v=m.d_v, k=r.k, site=site, head=head,
                                 n_heads=m.n_heads, family=m.family, layer=layer, input_layout=layout, aux_k=128,
                                 resample_every=every)
    cfg.metadata.hook_name = model.hook_prefix(layer) + f"hook_{site}"
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        sae, _ = train_write_sae(cfg, provider, Path(tmp) / "run", total_samples=samples, batch_size=batch, lr=r.lr,
                                 val_batches=None, n_checkpoints=0)
    met = evaluate_sae(sae, val, layout)
    return {"arch": arch, "cell": f"L{layer}.H{head}.{site}", "resample_every": every, "samples": samples,
            "fvu": round(met.fvu, 4), "l0": round(met.l0, 2), "dead": round(met.dead_fraction, 4),
            "seconds": round(time.perf_counter() - t0, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", type=float, default=0.25, help="x the release's sample budget")
    p.add_argument("--every", type=int, default=200, help="resample_every of the 'on' runs (steps)")
    p.add_argument("--archs", default="qwen3_5,mamba2")
    p.add_argument("--sites", default="state,write")
    p.add_argument("--seeds", type=int, default=1, help="seeds per setting")
    a = p.parse_args()
    torch.set_num_threads(2)
    for arch in a.archs.split(","):
        for site in a.sites.split(","):
            for seed in range(a.seeds):
                for every in (0, a.every):
                    print(json.dumps(run(arch, site, every, a.scale, seed)), flush=True)


if __name__ == "__main__":
    main()
