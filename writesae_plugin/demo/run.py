"""``writesae demo``: the shipped model and SAEs through the paper's three tests on held-out stdlib text."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import corpus
from .release import RELEASE, sae_id


def assets_dir() -> Path:
    from importlib.resources import files

    return Path(str(files("writesae_plugin").joinpath("assets")))


def demo_model_dir(override: str | Path | None = None) -> Path:
    path = Path(override) if override is not None else assets_dir() / "demo" / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"the demo model is not in this install ({path}); build it with "
                                "`writesae make-demo-model --out DIR` and load that directory")
    return path


def load_demo_model(model_dir: str | Path | None = None):
    """The shipped demo model, hooked, with its tokenizer (``AutoModelForCausalLM`` from package data)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..adapters import hook_model

    path = demo_model_dir(model_dir)
    return hook_model(AutoModelForCausalLM.from_pretrained(path).eval(), tokenizer=AutoTokenizer.from_pretrained(path))


def demo_release_dir(override: str | Path | None = None) -> Path:
    return Path(override) if override is not None else assets_dir() / "releases" / RELEASE


def demo_release_info(release_dir: str | Path | None = None) -> dict:
    path = demo_release_dir(release_dir) / "release.json"
    if not path.is_file():
        raise FileNotFoundError(f"the demo SAE release is not in this install ({path})")
    return json.loads(path.read_text())


@dataclass
class DemoSize:
    contexts: int = 48
    context_length: int = 128
    max_firings: int = 300
    cf_atoms: int = 4
    cf_contexts: int = 8
    install_prompts: int = 16
    install_tokens: int = 20


QUICK = DemoSize(contexts=6, context_length=96, max_firings=12, cf_atoms=1, cf_contexts=3, install_prompts=2,
                 install_tokens=8)


def held_out_contexts(tokenizer, n: int, T: int) -> torch.Tensor:
    """``n`` contexts of ``T`` tokens from the stdlib test split (never used for training)."""
    from ..data import token_contexts

    ctx = []
    for c in token_contexts(corpus.texts("test"), tokenizer, T):
        ctx.append(c)
        if len(ctx) >= n:
            break
    if len(ctx) < n:
        raise RuntimeError(f"the test split yields only {len(ctx)} contexts of {T} tokens")
    return torch.stack(ctx)


def run_demo(out_dir: str | Path, size: DemoSize | None = None, progress: bool = True,
             model_dir: str | Path | None = None, release_dir: str | Path | None = None) -> dict:
    """Run the three tests; ``model_dir`` / ``release_dir`` default to the shipped package data."""
    from sae_lens import SAE

    from ..experiments.closed_form import ClosedFormConfig, run_closed_form, save_closed_form
    from ..experiments.install import InstallConfig, run_install, save_install
    from ..experiments.substitution import SubstitutionConfig, run_substitution, save_substitution
    from ..registry import register_local_release
    from ..report import write_report

    size = size or DemoSize()
    t0 = time.time()
    out = Path(out_dir)
    model = load_demo_model(model_dir)
    register_local_release(RELEASE, demo_release_dir(release_dir))
    info = demo_release_info(release_dir)
    layer, head = info["recipe"]["layer"], info["recipe"]["head"]
    sae_state = SAE.from_pretrained(RELEASE, sae_id("state", layer, head))
    tokens = held_out_contexts(model.tokenizer, size.contexts, size.context_length)
    timings = {}

    t = time.time()
    sub = run_substitution(model, sae_state, tokens, SubstitutionConfig(
        max_firings=size.max_firings, max_per_context=max(1, size.max_firings // size.contexts), max_per_atom=10),
        progress=progress)
    save_substitution(sub, out / "substitution", {"sae": f"{RELEASE}:{sae_id('state', layer, head)}"})
    timings["substitution_s"] = time.time() - t

    t = time.time()
    counts = torch.bincount(torch.tensor([f["atom"] for f in sub.firings] or [0]), minlength=sae_state.cfg.d_sae)
    atoms = counts.argsort(descending=True)[: size.cf_atoms].tolist()
    cf = run_closed_form(model, sae_state, tokens[: size.cf_contexts, :64], ClosedFormConfig(atoms=atoms, t0=16),
                         progress=progress)
    save_closed_form(cf, out / "closed_form", {"sae": f"{RELEASE}:{sae_id('state', layer, head)}"})
    timings["closed_form_s"] = time.time() - t

    t = time.time()
    ins = run_install(model, tokens[: size.install_prompts, :48], InstallConfig(
        layer=layer, head=head, strata=((10, 100), (100, 1000)), targets_per_stratum=2, multipliers=(3.0,),
        max_new_tokens=size.install_tokens), progress=progress)
    save_install(ins, out / "install")
    timings["install_s"] = time.time() - t

    head_sub = sub.summary.get("headline", {})
    summary = {
        "model": {"path": str(demo_model_dir(model_dir)), "validation_loss_nats": json.loads(
            (demo_model_dir(model_dir) / "recipe.json").read_text())["validation_loss_nats"]},
        "substitution": {"atom_act_vs_delete": head_sub, "paper": "92.4% of n = 4,851 (Qwen3.5-0.8B L9 H4)"},
        "closed_form": {k: v for k, v in cf.summary.get("pooled", {}).items()},
        "install": ins.summary["by_multiplier"]["3.0"],
        "timings": {**timings, "total_s": time.time() - t0}, "size": size.__dict__,
        "held_out": "stdlib test split", "layer": layer, "head": head,
    }
    write_report(out, "writesae demo", summary, None, None, [
        "Sub-reports: substitution/index.html, closed_form/index.html, install/index.html.",
        "All numbers are measured on the shipped demo model (trained on the Python standard library) and held-out "
        "stdlib files; the paper's figures are for Qwen3.5-0.8B and are shown for orientation only."])
    return summary


def summary_table(summary: dict) -> str:
    from ..report import fmt_rate

    rows = [("substitution: atom_act beats delete", fmt_rate(summary["substitution"]["atom_act_vs_delete"]),
             "92.4% (n=4851)")]
    for name, v in summary["closed_form"].items():
        rows.append((f"closed form R^2 ({name})", f"{v['r2']:.3f} (n={v['n']}), sign agr. {v['sign_agreement']:.2f}",
                     {"jvp": "-", "direct": "-0.06", "fitted_g": "0.98 (per prompt)"}[name]))
    for key, v in summary["install"].items():
        rows.append((f"install target in continuation, {key}",
                     f"{fmt_rate(v['installed_rate'])} vs base {100 * v['baseline_rate']['rate']:.1f}%",
                     "100% vs 33.3% (ranks 100-1000)" if "100-1000" in key else "-"))
    w = max(len(r[0]) for r in rows)
    lines = [f"{'test':{w}s}  {'measured (95% CI)':52s}  paper"]
    lines += [f"{a:{w}s}  {b:52s}  {c}" for a, b, c in rows]
    lines.append(f"total time {summary['timings']['total_s']:.0f} s")
    return "\n".join(lines)
