"""``writesae demo``: the shipped models and SAEs through the paper's three tests on held-out stdlib text.

Two architectures ship (``qwen3_5``: Gated DeltaNet, ``mamba2``); both use the same tokenizer, so the
cross-architecture comparison (:func:`run_demo_all`) runs them on identical held-out token contexts."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import corpus
from .release import RELEASES, sae_id


def assets_dir() -> Path:
    from importlib.resources import files

    return Path(str(files("writesae_plugin").joinpath("assets")))


DEMO_ARCHS = {"qwen3_5": "model", "mamba2": "mamba2"}  # arch -> folder under assets/demo
ARCH_NAMES = {"qwen3_5": "Gated DeltaNet (Qwen3.5)", "mamba2": "Mamba-2"}


def demo_model_dir(override: str | Path | None = None, arch: str = "qwen3_5") -> Path:
    """The shipped demo model of ``arch`` (``qwen3_5``: Gated DeltaNet, ``mamba2``), or ``override``."""
    if arch not in DEMO_ARCHS:
        raise ValueError(f"arch must be one of {sorted(DEMO_ARCHS)}, got {arch!r}")
    path = Path(override) if override is not None else assets_dir() / "demo" / DEMO_ARCHS[arch]
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"the demo model is not in this install ({path}); build it with "
                                "`writesae make-demo-model --out DIR` and load that directory")
    return path


def load_demo_model(model_dir: str | Path | None = None, arch: str = "qwen3_5"):
    """The shipped demo model of ``arch``, hooked, with its tokenizer (``AutoModelForCausalLM`` from
    package data)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..adapters import hook_model, route_cpu_to_torch

    path = demo_model_dir(model_dir, arch)
    route_cpu_to_torch()  # with fla installed: transformers' own mamba2 class, not fla's (see hook_model)
    return hook_model(AutoModelForCausalLM.from_pretrained(path).eval(), tokenizer=AutoTokenizer.from_pretrained(path))


def demo_release_dir(override: str | Path | None = None, arch: str = "qwen3_5") -> Path:
    if arch not in RELEASES:
        raise ValueError(f"arch must be one of {sorted(RELEASES)}, got {arch!r}")
    return Path(override) if override is not None else assets_dir() / "releases" / RELEASES[arch]


def demo_release_info(release_dir: str | Path | None = None, arch: str = "qwen3_5") -> dict:
    path = demo_release_dir(release_dir, arch) / "release.json"
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
    dashboard_contexts: int = 16
    dashboard_pages: int = 24
    dashboard_firings: int = 4
    #: atoms with pages besides the most frequent ones (those the README describes)
    dashboard_atoms: dict = field(default_factory=lambda: {"L4.H0.write": [313, 97]})
    #: a release with more SAEs than this gets dashboards for its demo_saes only (see dashboard_saes)
    dashboard_max_saes: int = 8


def dashboard_saes(info: dict, size: DemoSize, layer: int, head: int) -> list[str]:
    """The release SAEs whose dashboards the demo precomputes: every SAE of a release of at most
    ``size.dashboard_max_saes`` (the shipped ones), else its ``demo_saes`` (default: the headline cell's state
    and write SAEs); plus those named in ``size.dashboard_atoms`` (the README's examples)."""
    saes = list(info.get("saes") or {})
    ids = saes if saes and len(saes) <= size.dashboard_max_saes else \
        list(info.get("demo_saes") or [sae_id(s, layer, head) for s in ("state", "write")])
    return sorted(set(ids) | {s for s in size.dashboard_atoms if s in saes})


def demo_dashboards(model, release: str, sae_ids, tokens: torch.Tensor, out: Path, size: DemoSize,
                    progress: bool = True) -> list[tuple[str, str]]:
    """Dashboards of the release's SAEs on ``tokens`` (``out/dashboards/{sae_id}/``): every atom's statistics
    from one pass, pages for the ``size.dashboard_pages`` most frequent atoms and ``size.dashboard_atoms``.
    Returns ``(label, href)`` links relative to ``out``."""
    from sae_lens import SAE

    from ..dashboard import DashboardConfig, compute_dashboard, write_dashboard

    links = []
    for sid in sae_ids:
        sae = SAE.from_pretrained(release, sid)
        cfg = DashboardConfig(max_pages=size.dashboard_pages, value_firings=size.dashboard_firings,
                              effect_firings=size.dashboard_firings, atoms=size.dashboard_atoms.get(sid))
        data = compute_dashboard(model, sae, tokens, cfg, progress=progress)
        write_dashboard(data, out / "dashboards" / sid, model.tokenizer, title=f"{release}:{sid}", progress=progress)
        links.append((f"atom dashboard {release}:{sid}", f"dashboards/{sid}/index.html"))
    return links


QUICK = DemoSize(contexts=6, context_length=96, max_firings=12, cf_atoms=1, cf_contexts=3, install_prompts=2,
                 install_tokens=8, dashboard_contexts=2, dashboard_pages=2, dashboard_firings=1, dashboard_atoms={})


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
             model_dir: str | Path | None = None, release_dir: str | Path | None = None,
             arch: str = "qwen3_5") -> dict:
    """Run the three tests on one architecture's demo model and state SAE; ``model_dir`` / ``release_dir``
    default to the shipped package data. Returns the summary (also in ``out_dir/results.json``)."""
    from sae_lens import SAE

    from ..experiments.closed_form import ClosedFormConfig, run_closed_form, save_closed_form
    from ..experiments.install import InstallConfig, run_install, save_install
    from ..experiments.substitution import SubstitutionConfig, run_substitution, save_substitution
    from ..registry import register_local_release
    from ..report import write_report

    size = size or DemoSize()
    t0 = time.time()
    out = Path(out_dir)
    model = load_demo_model(model_dir, arch)
    release = RELEASES[arch]
    register_local_release(release, demo_release_dir(release_dir, arch))
    info = demo_release_info(release_dir, arch)
    layer, head = info["recipe"]["layer"], info["recipe"]["head"]
    sae_state = SAE.from_pretrained(release, sae_id("state", layer, head))
    tokens = held_out_contexts(model.tokenizer, size.contexts, size.context_length)
    timings = {}

    t = time.time()
    sub = run_substitution(model, sae_state, tokens, SubstitutionConfig(
        max_firings=size.max_firings, max_per_context=max(1, size.max_firings // size.contexts), max_per_atom=10),
        progress=progress)
    save_substitution(sub, out / "substitution", {"sae": f"{release}:{sae_id('state', layer, head)}"})
    sae_write = SAE.from_pretrained(release, sae_id("write", layer, head))
    sub_w = run_substitution(model, sae_write, tokens, SubstitutionConfig(
        max_firings=size.max_firings, max_per_context=max(1, size.max_firings // size.contexts), max_per_atom=10),
        progress=progress)
    save_substitution(sub_w, out / "substitution_write", {"sae": f"{release}:{sae_id('write', layer, head)}"})
    timings["substitution_s"] = time.time() - t

    t = time.time()
    counts = torch.bincount(torch.tensor([f["atom"] for f in sub.firings] or [0]), minlength=sae_state.cfg.d_sae)
    atoms = counts.argsort(descending=True)[: size.cf_atoms].tolist()
    cf = run_closed_form(model, sae_state, tokens[: size.cf_contexts, :64], ClosedFormConfig(atoms=atoms, t0=16),
                         progress=progress)
    save_closed_form(cf, out / "closed_form", {"sae": f"{release}:{sae_id('state', layer, head)}"})
    timings["closed_form_s"] = time.time() - t

    t = time.time()
    ins = run_install(model, tokens[: size.install_prompts, :48], InstallConfig(
        layer=layer, head=head, strata=((10, 100), (100, 1000)), targets_per_stratum=2, multipliers=(3.0,),
        max_new_tokens=size.install_tokens), progress=progress)
    save_install(ins, out / "install")
    timings["install_s"] = time.time() - t

    t = time.time()
    dash_links = demo_dashboards(model, release, dashboard_saes(info, size, layer, head),
                                 tokens[: size.dashboard_contexts], out, size, progress=progress)
    timings["dashboards_s"] = time.time() - t

    head_sub = sub.summary.get("headline", {})
    summary = {
        "arch": arch, "model": {"path": str(demo_model_dir(model_dir, arch)), "validation_loss_nats": json.loads(
            (demo_model_dir(model_dir, arch) / "recipe.json").read_text())["validation_loss_nats"]},
        "substitution": {"atom_act_vs_delete": head_sub, "paper": "92.4% of n = 4,851 (Qwen3.5-0.8B L9 H4)",
                         "sae": sae_id("state", layer, head)},
        "substitution_write": {"atom_act_vs_delete": sub_w.summary.get("headline", {}),
                               "sae": sae_id("write", layer, head)},
        "closed_form": {k: v for k, v in cf.summary.get("pooled", {}).items()},
        "install": ins.summary["by_multiplier"]["3.0"],
        "timings": {**timings, "total_s": time.time() - t0}, "size": size.__dict__,
        "held_out": "stdlib test split", "layer": layer, "head": head,
    }
    sub_links = [("substitution test (state SAE)", "substitution/index.html"),
                 ("substitution test (write SAE)", "substitution_write/index.html"),
                 ("closed-form logit shift", "closed_form/index.html"), ("behavioural install", "install/index.html")]
    summary["dashboards"] = [href for _, href in dash_links]
    write_report(out, f"writesae demo ({ARCH_NAMES[arch]})", summary, None, None, [
        "Sub-reports and the atom dashboards of every shipped SAE are linked below.",
        "All numbers are measured on the shipped demo model (trained on the Python standard library) and held-out "
        "stdlib files; the paper's figures are for Qwen3.5-0.8B and are shown for orientation only."],
        links=sub_links + dash_links,
        headline=[("state SAE: atom_act beats delete (KL at the final position)", head_sub),
                  ("write SAE: atom_act beats delete (KL at the final position)", sub_w.summary.get("headline", {}))])
    return summary


PAPER = {"substitution": "92.4% (n=4851)", "jvp": "-", "direct": "-0.06", "fitted_g": "0.98 (per prompt)",
         "install_100_1000": "100% vs 33.3% (ranks 100-1000)"}


def _rows(summary: dict) -> list[tuple[str, str, str]]:
    from ..report import fmt_rate

    rows = [("substitution (state SAE): atom_act beats delete",
             fmt_rate(summary["substitution"]["atom_act_vs_delete"]), PAPER["substitution"])]
    if "substitution_write" in summary:
        rows.append(("substitution (write SAE): atom_act beats delete",
                     fmt_rate(summary["substitution_write"]["atom_act_vs_delete"]), "-"))
    for name, v in summary["closed_form"].items():
        rows.append((f"closed form R^2 ({name})", f"{v['r2']:.3f} (n={v['n']}), sign agr. {v['sign_agreement']:.2f}",
                     PAPER[name]))
    for key, v in summary["install"].items():
        rows.append((f"install target in continuation, {key}",
                     f"{fmt_rate(v['installed_rate'])} vs base {100 * v['baseline_rate']['rate']:.1f}%"
                     + ("" if v.get("vs_baseline", {}).get("significant", True)
                        else f" (n.s., p = {v['vs_baseline']['p']:.2g})"),
                     PAPER["install_100_1000"] if "100-1000" in key else "-"))
    return rows


def summary_table(summary: dict) -> str:
    """A text table of one architecture's summary (:func:`run_demo`) or of several (:func:`run_demo_all`)."""
    per_arch = summary["by_arch"] if "by_arch" in summary else {summary.get("arch", "qwen3_5"): summary}
    archs = list(per_arch)
    table = {arch: _rows(s) for arch, s in per_arch.items()}
    labels = [r[0] for r in table[archs[0]]]
    w = max(len(x) for x in labels)
    lines = [f"{'test':{w}s}  " + "  ".join(f"{ARCH_NAMES[a] + ' (95% CI)':52s}" for a in archs) + "  paper"]
    for i, label in enumerate(labels):
        cells = "  ".join(f"{table[a][i][1] if i < len(table[a]) else '-':52s}" for a in archs)
        lines.append(f"{label:{w}s}  {cells}  {table[archs[0]][i][2]}")
    for key, site in (("win_rate_difference", "state"), ("win_rate_difference_write", "write")):
        d = summary.get("comparison", {}).get(key)
        if d:
            lines.append(f"win rate difference ({site} SAEs) {ARCH_NAMES[archs[0]]} - {ARCH_NAMES[archs[-1]]}: "
                         f"{100 * d['difference']:+.1f} points [{100 * d['lo']:+.1f}, {100 * d['hi']:+.1f}]")
    total = summary["timings"]["total_s"] if "timings" in summary else sum(
        s["timings"]["total_s"] for s in per_arch.values())
    lines.append(f"total time {total:.0f} s")
    return "\n".join(lines)


def run_demo_all(out_dir: str | Path, size: DemoSize | None = None, progress: bool = True,
                 archs: tuple[str, ...] = ("qwen3_5", "mamba2")) -> dict:
    """Run :func:`run_demo` for each shipped architecture (``out_dir/<arch>/``) on the same held-out
    contexts and write the cross-architecture comparison to ``out_dir`` (win rates with Wilson intervals
    and their difference, closed-form quality per predictor, install rates)."""
    from ..experiments.stats import rate_difference
    from ..report import plt, write_report

    t0 = time.time()
    out = Path(out_dir)
    by_arch = {arch: run_demo(out / arch, size, progress, arch=arch) for arch in archs}
    comparison = {}
    if len(archs) >= 2:
        a, b = (by_arch[x]["substitution"]["atom_act_vs_delete"] for x in archs[:2])
        comparison["win_rate_difference"] = rate_difference(a, b)
        a, b = (by_arch[x]["substitution_write"]["atom_act_vs_delete"] for x in archs[:2])
        comparison["win_rate_difference_write"] = rate_difference(a, b)
        comparison["archs"] = list(archs[:2])
    summary = {"by_arch": by_arch, "comparison": comparison, "timings": {"total_s": time.time() - t0},
               "held_out": "stdlib test split (identical token contexts: the demo models share one tokenizer)"}

    def fig_cross_architecture():
        names = [ARCH_NAMES[x] for x in archs]
        colors = ["tab:blue", "tab:orange", "tab:green"][: len(archs)]
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
        width = 0.8 / len(archs)
        for j, x in enumerate(archs):
            rates = [by_arch[x][k]["atom_act_vs_delete"] for k in ("substitution", "substitution_write")]
            ys = [100 * r["rate"] if r.get("n") else 0.0 for r in rates]
            err = [[100 * (r["rate"] - r["lo"]) if r.get("n") else 0.0 for r in rates],
                   [100 * (r["hi"] - r["rate"]) if r.get("n") else 0.0 for r in rates]]
            ax1.bar([i + j * width for i in range(2)], ys, width, yerr=err, capsize=5, color=colors[j],
                    label=f"{names[j]} (n={rates[0].get('n', 0)}, {rates[1].get('n', 0)} firings)")
        ax1.set_xticks([i + width * (len(archs) - 1) / 2 for i in range(2)], ["state SAE", "write SAE"])
        ax1.axhline(50, color="grey", lw=0.8, ls="--")
        ax1.set_ylim(0, 115)
        ax1.legend(fontsize=8, loc="upper center")
        ax1.set_ylabel("% of firings (95% Wilson CI)")
        ax1.set_title("substitution: atom_act beats delete")
        preds = list(by_arch[archs[0]]["closed_form"])
        width = 0.8 / len(archs)
        for j, x in enumerate(archs):
            cf = by_arch[x]["closed_form"]
            ax2.bar([i + j * width for i in range(len(preds))], [cf[p]["r2"] for p in preds], width,
                    label=names[j], color=colors[j])
        ax2.set_xticks([i + width * (len(archs) - 1) / 2 for i in range(len(preds))], preds)
        ax2.axhline(0, color="grey", lw=0.8)
        ax2.set_ylabel("R^2, predicted vs actual logit shift")
        ax2.set_title("closed-form logit shift")
        ax2.legend()
        fig.tight_layout()
        return fig

    links = [(f"{ARCH_NAMES[x]} report", f"{x}/index.html") for x in archs]
    links += [(f"{ARCH_NAMES[x]}: {label}", f"{x}/{href}") for x in archs
              for label, href in zip([f"atom dashboard {d.split('/')[1]}" for d in by_arch[x].get("dashboards", [])],
                                     by_arch[x].get("dashboards", []))]
    write_report(out, "writesae demo: Gated DeltaNet vs Mamba-2", summary, None, {"cross_architecture": fig_cross_architecture}, [
        "The same three tests on both shipped demo models (same corpus, tokenizer, training steps and held-out "
        "contexts); per-architecture reports and the atom dashboards of every shipped SAE are linked below.",
        "Win-rate difference: difference of proportions with a Newcombe (Wilson) 95% interval."], links=links)
    return summary
