"""``writesae make-demo-release``: train the shipped WriteSAE release for the demo model.

Every (layer, head) of every recurrent layer, state and write sites: per layer and site, one extraction of the
stdlib train split into a temporary activation store (``store.extract``: one model forward per batch for all
heads), then every head's SAE trained together along a cell axis (``cells.train_cells_stacked``), validated on
the validation split during training. Each final SAE is then evaluated as before on fixed held-out contexts (the
validation split, every position). The release directory holds ``<sae_id>/`` (``SAE.load_from_disk`` format,
with its ``validation.jsonl``), ``release.json`` (ids, the model, the recorded FVU / L0 / dead fraction per cell
with their evaluation contexts, the recipe, the demo's headline cell) and ``eval_tokens.safetensors``.
"""

from __future__ import annotations

import itertools
import json
import shutil
import tempfile
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
    layer: int = 2  # the demo's headline cell (its substitution, closed-form and install tests)
    head: int = 1
    d_sae: int = 512
    k: int = 16
    context_length: int = 128
    state_samples: int = 64 * 2000  # per cell (the first releases: 64 x 1200 state, 256 x 800 write)
    write_samples: int = 256 * 1200
    batch_state: int = 64
    batch_write: int = 256
    state_stride: int = 2  # state matrices at every 2nd position of the training contexts (the scan that
    # captures states costs the same for any stride, so 2 halves the contexts; the first releases used 4)
    lr: float = 2e-3
    aux_k: int = 128
    resample_every: int = 100  # benchmarks/RESULTS.md: resampling
    eval_contexts: int = 24
    val_contexts: int = 8  # validation split contexts for the curves during training
    seed: int = 0


def release_recipe(arch: str) -> ReleaseRecipe:
    """The release recipe of a demo architecture: the same sizes; the headline cell at a comparable depth
    (GDN demo: layer 2 of 6; Mamba-2 demo: layer 3 of 8)."""
    if arch == "qwen3_5":
        return ReleaseRecipe()
    if arch == "mamba2":  # 8 layers x 16 heads = 128 cells per site (GDN: 5 x 4 = 20): fewer samples per cell than
        # the GDN recipe, still more than the first releases (64 x 1200 state, 256 x 800 write matrices)
        return ReleaseRecipe(layer=3, head=1, state_samples=64 * 1300, write_samples=256 * 850)
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
                      layers: list[int] | None = None, progress: bool = True) -> dict:
    """Train, evaluate and write the release of the demo model in ``model_dir`` (architecture from its config;
    ``recipe`` defaults to :func:`release_recipe` of that architecture): the state and write SAEs of every head
    of every recurrent layer. ``layers``: train just these layers and merge them into the release already in
    ``out_dir``. Returns the release index (``release.json``)."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..adapters import hook_model

    hf = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    arch = arch_of(hf)
    recipe = recipe or release_recipe(arch)
    model = hook_model(hf, tokenizer=AutoTokenizer.from_pretrained(model_dir))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    evals = torch.stack(list(_contexts(model.tokenizer, "validation", recipe.context_length, recipe.eval_contexts)))
    save_file({"input_ids": evals.contiguous()}, str(out / "eval_tokens.safetensors"))
    meta = {"release": RELEASES[arch], "arch": arch, "model": MODEL_NAMES[arch], "recipe": asdict(recipe),
            "saes": {}, "expected_var_explained": {}, "expected_l0": {}, "expected_fvu": {}}
    all_layers = list(model.cfg.recurrent_layers)
    if layers is not None:
        bad = [layer for layer in layers if layer not in all_layers]
        if bad:
            raise ValueError(f"layers {bad} are not recurrent layers of this model ({all_layers})")
        if not (out / "release.json").is_file():
            raise FileNotFoundError(f"layers= merges into an existing release; {out / 'release.json'} is missing")
        meta = {**json.loads((out / "release.json").read_text()), "recipe": asdict(recipe)}
    meta["weights_dtype"] = "float16"  # stored; loaded as float32 (see _as_package_data)
    meta["demo_saes"] = [sae_id(site, recipe.layer, recipe.head) for site in ("state", "write")]
    for layer, site in itertools.product(all_layers if layers is None else layers, ("state", "write")):
        meta = _train_layer(model, recipe, evals, out, meta, layer, site, progress)
        (out / "release.json").write_text(json.dumps(meta, indent=2))
    return meta


def _as_package_data(sae_dir: Path, model_name: str) -> None:
    """Make a trained SAE directory shippable: its weights stored in float16 (half the package size; loaded back
    as the cfg's float32, relative error ~2e-4, and every number the release records is measured on the stored
    weights), its ``model_name`` the demo model's name, not the builder's path."""
    from safetensors.torch import load_file, save

    from ..checkpoints import atomic_write_bytes, atomic_write_text

    weights = sae_dir / "sae_weights.safetensors"
    state = load_file(str(weights))
    atomic_write_bytes(weights, save({k: v.to(torch.float16) if v.is_floating_point() else v
                                      for k, v in state.items()}))
    cfg = json.loads((sae_dir / "cfg.json").read_text())
    cfg.setdefault("metadata", {})["model_name"] = model_name
    atomic_write_text(sae_dir / "cfg.json", json.dumps(cfg))


def _train_layer(model, recipe: ReleaseRecipe, evals, out: Path, meta: dict, layer: int, site: str,
                 progress: bool) -> dict:
    """Train every head's ``site`` SAE of ``layer`` together from one extraction, evaluate and store each."""
    from sae_lens import SAE

    from ..cells import Cell, CellTraining, train_cells_stacked
    from ..data import ActivationProvider, SiteSpec
    from ..store import ActivationStore, ExtractConfig, extract
    from ..train import evaluate_sae

    state = site == "state"
    batch = recipe.batch_state if state else recipe.batch_write
    samples = recipe.state_samples if state else recipe.write_samples
    positions = ("stride", recipe.state_stride) if state else "all"
    per_context = len(range(0, recipe.context_length, recipe.state_stride)) if state else recipe.context_length
    n_contexts = -(-samples // per_context) + 2  # + a margin for the shuffle buffer's last batch
    heads = list(range(model.cfg.n_heads))
    cfg = ExtractConfig(layers=[layer], site=site, positions=positions, dtype="float16" if state else "float32",
                        contexts_per_shard=32, forward_batch=8, seed=recipe.seed,
                        data={"dataset": "stdlib corpus (package data)", "context_length": recipe.context_length})
    t = CellTraining(d_sae=recipe.d_sae, k=recipe.k, aux_k=recipe.aux_k, resample_every=recipe.resample_every,
                     total_samples=samples, batch_size=batch, lr=recipe.lr, val_contexts=recipe.val_contexts,
                     val_every=200, n_checkpoints=0, seed=recipe.seed)
    cells = [Cell(layer, head, site) for head in heads]
    with tempfile.TemporaryDirectory(prefix=f"release-L{layer}-{site}-", dir=out) as work:
        work = Path(work)
        store = ActivationStore(extract(model, _contexts(model.tokenizer, "train", recipe.context_length, n_contexts),
                                        work / "store", cfg, progress=progress))
        val_store = ActivationStore(extract(model, _contexts(model.tokenizer, "validation", recipe.context_length,
                                                             recipe.val_contexts, skip=recipe.eval_contexts),
                                            work / "val_store", cfg, progress=False))
        train_cells_stacked(store, cells, work / "train", t, val_store=val_store, progress=progress)
        for cell in cells:
            sid = sae_id(site, layer, cell.head)
            if (out / sid).exists():
                shutil.rmtree(out / sid)
            shutil.move(str(work / "train" / "runs" / cell.id / "final"), str(out / sid))
            shutil.copy2(work / "train" / "runs" / cell.id / "validation.jsonl", out / sid / "validation.jsonl")
            _as_package_data(out / sid, MODEL_NAMES[meta["arch"]])
    layout = "factors" if site == "write" else "dense"
    for cell in cells:  # the recorded numbers: every position of the fixed held-out contexts
        sid = sae_id(site, layer, cell.head)
        spec = SiteSpec(layer=layer, site=site, heads=[cell.head], positions="all", layout=layout)
        val = list(ActivationProvider(model, iter(evals), spec, batch_size=512, buffer_batches=2, seed=recipe.seed + 1,
                                      drop_last=False))
        m = evaluate_sae(SAE.load_from_disk(out / sid), val, layout)
        meta["saes"][sid] = sid
        meta["expected_fvu"][sid] = m.fvu
        meta["expected_var_explained"][sid] = 1 - m.fvu
        meta["expected_l0"][sid] = m.l0
        meta.setdefault("dead_fraction", {})[sid] = m.dead_fraction
        meta.setdefault("n_eval_matrices", {})[sid] = m.n
        meta.setdefault("sites", {})[sid] = {"layer": layer, "head": cell.head, "site": site}
    return meta
