"""``writesae make-demo-release``: train the shipped WriteSAE release for the demo model.

One per-head SAE per site (state and write) at the demo layer/head, trained with ``train_write_sae`` on the
stdlib train split, evaluated on fixed held-out contexts (the validation split); the release directory
holds ``<sae_id>/`` (``SAE.load_from_disk`` format), ``release.json`` (ids, the model, the recorded FVU and
L0 with their evaluation contexts) and ``eval_tokens.safetensors``.
"""

from __future__ import annotations

import itertools
import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from . import corpus

RELEASE = "writesae-demo"  # the Gated DeltaNet (Qwen3.5) demo release
RELEASES = {"qwen3_5": RELEASE, "mamba2": "writesae-demo-mamba2"}
MODEL_NAMES = {"qwen3_5": "writesae-plugin demo Qwen3.5 (package data)",
               "mamba2": "writesae-plugin demo Mamba-2 (package data)"}


@dataclass
class ReleaseRecipe:
    layer: int = 2
    head: int = 1
    d_sae: int = 512
    k: int = 16
    context_length: int = 128
    state_samples: int = 64 * 1200
    write_samples: int = 256 * 800
    batch_state: int = 64
    batch_write: int = 256
    lr: float = 2e-3
    eval_contexts: int = 24
    seed: int = 0
    extra_heads: tuple[tuple[int, int], ...] = ()  # more (layer, head) pairs, same sites and sizes


def release_recipe(arch: str) -> ReleaseRecipe:
    """The release recipe of a demo architecture: the same sizes, the layer/head at a comparable depth
    (GDN demo: layer 2 of 6; Mamba-2 demo: layer 3 of 8)."""
    if arch == "qwen3_5":  # L4.H0: where the quote-matching behaviour of the circuit commands lives
        return ReleaseRecipe(extra_heads=((4, 0),))
    if arch == "mamba2":
        return ReleaseRecipe(layer=3, head=1)
    raise ValueError(f"no demo release recipe for arch {arch!r}; expected one of {sorted(RELEASES)}")


def arch_of(hf_model) -> str:
    """The demo architecture of an HF model (``qwen3_5`` or ``mamba2``) from its config."""
    model_type = hf_model.config.model_type
    if model_type.startswith("qwen3_5"):
        return "qwen3_5"
    if model_type == "mamba2":
        return "mamba2"
    raise ValueError(f"no demo architecture for model_type {model_type!r}; expected a Qwen3.5 or a Mamba-2 model")


def sae_id(site: str, layer: int, head: int) -> str:
    return f"L{layer}.H{head}.{site}"


def _contexts(tokenizer, split: str, T: int, n: int | None = None, skip: int = 0):
    from ..data import token_contexts

    it = token_contexts(corpus.texts(split), tokenizer, T)
    return itertools.islice(it, skip, None if n is None else skip + n)


def make_demo_release(model_dir: str | Path, out_dir: str | Path, recipe: ReleaseRecipe | None = None,
                      only: list[tuple[int, int]] | None = None) -> dict:
    """Train, evaluate and write the release of the demo model in ``model_dir`` (architecture from its
    config; ``recipe`` defaults to :func:`release_recipe` of that architecture): the state and write SAEs
    of ``(recipe.layer, recipe.head)`` and of each of ``recipe.extra_heads``. ``only``: train just these
    (layer, head) pairs and merge them into the release already in ``out_dir``."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..adapters import hook_model

    hf = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    arch = arch_of(hf)
    recipe = recipe or release_recipe(arch)
    torch.manual_seed(recipe.seed)
    model = hook_model(hf, tokenizer=AutoTokenizer.from_pretrained(model_dir))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    evals = torch.stack(list(_contexts(model.tokenizer, "validation", recipe.context_length, recipe.eval_contexts)))
    save_file({"input_ids": evals.contiguous()}, str(out / "eval_tokens.safetensors"))
    meta = {"release": RELEASES[arch], "arch": arch, "model": MODEL_NAMES[arch], "recipe": asdict(recipe),
            "saes": {}, "expected_var_explained": {}, "expected_l0": {}, "expected_fvu": {}}
    if only is not None:
        if not (out / "release.json").is_file():
            raise FileNotFoundError(f"only= merges into an existing release; {out / 'release.json'} is missing")
        meta = {**json.loads((out / "release.json").read_text()), "recipe": asdict(recipe)}
    pairs = [(recipe.layer, recipe.head), *recipe.extra_heads] if only is None else list(only)
    for (layer, head), site in itertools.product(pairs, ("state", "write")):
        if (layer, head) != (recipe.layer, recipe.head) and site == "state":
            torch.manual_seed(recipe.seed + 1000 * layer + head)  # extra pairs: reproducible alone (only=)
        meta = _train_one(model, recipe, evals, out, meta, layer, head, site)
    (out / "release.json").write_text(json.dumps(meta, indent=2))
    return meta


def _train_one(model, recipe: ReleaseRecipe, evals, out: Path, meta: dict, layer: int, head: int, site: str) -> dict:
    """Train, evaluate and store one SAE of the release (``<out>/L{layer}.H{head}.{site}``)."""
    from ..data import ActivationProvider, SiteSpec
    from ..sae import WriteSAETrainingConfig
    from ..train import evaluate_sae, train_write_sae

    mcfg = model.cfg
    layout = "factors" if site == "write" else "dense"
    spec = SiteSpec(layer=layer, site=site, heads=[head],
                    positions=("stride", 4) if site == "state" else "all", layout=layout)
    batch = recipe.batch_state if site == "state" else recipe.batch_write
    samples = recipe.state_samples if site == "state" else recipe.write_samples
    provider = ActivationProvider(model, _contexts(model.tokenizer, "train", recipe.context_length), spec,
                                  batch_size=batch, buffer_batches=8, seed=recipe.seed, normalize=True)
    val_spec = SiteSpec(layer=layer, site=site, heads=[head], positions="all", layout=layout)
    val = list(ActivationProvider(model, iter(evals), val_spec, batch_size=512, buffer_batches=2,
                                  seed=recipe.seed + 1))
    cfg = WriteSAETrainingConfig(d_in=mcfg.d_k * mcfg.d_v, d_sae=recipe.d_sae, d_k=mcfg.d_k, d_v=mcfg.d_v,
                                 k=recipe.k, site=site, head=head, n_heads=mcfg.n_heads,
                                 family=mcfg.family, layer=layer, input_layout=layout,
                                 hook_name_hf=model.family.hf_module_name(model.hf_model, layer),
                                 aux_k=128)
    cfg.metadata.hook_name = model.hook_prefix(layer) + f"hook_{site}"
    cfg.metadata.model_name = meta["model"]
    cfg.metadata.context_size = recipe.context_length
    cfg.metadata.prepend_bos = False
    work = out / f"_train_{sae_id(site, layer, head)}"
    sae, history = train_write_sae(cfg, provider, work, total_samples=samples, batch_size=batch, lr=recipe.lr,
                                   val_batches=val, val_every=200, n_checkpoints=0)
    sid = sae_id(site, layer, head)
    if (out / sid).exists():
        shutil.rmtree(out / sid)
    shutil.move(str(work / "final"), str(out / sid))
    (out / sid / "validation.jsonl").write_text((work / "validation.jsonl").read_text())
    shutil.rmtree(work)
    from sae_lens import SAE

    final = SAE.load_from_disk(out / sid)
    m = evaluate_sae(final, val, layout)
    meta["saes"][sid] = sid
    meta["expected_fvu"][sid] = m.fvu
    meta["expected_var_explained"][sid] = 1 - m.fvu
    meta["expected_l0"][sid] = m.l0
    meta.setdefault("dead_fraction", {})[sid] = m.dead_fraction
    meta.setdefault("n_eval_matrices", {})[sid] = m.n
    meta.setdefault("sites", {})[sid] = {"layer": layer, "head": head, "site": site}
    return meta

