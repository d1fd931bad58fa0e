"""Behavioural install (steering, docs/method.md 6.3).

For a target token ``T`` at (layer, head): value direction ``w*_T = normalize(W_O[:, head]^T W_U[T])``, key side
the position's own key ``k^_t``. The atom ``k^_t w*_T^T`` scaled to ``m ||k_t v_t^T||`` is installed (replace
or add) at the last ``n`` prompt positions, then the model decodes greedily with the install carried by the
recurrent state through the decode path. Targets are drawn per prompt from strata of their initial rank at
the first generated step. The independent unit is the (prompt, target) pair; intervals are Wilson over units
and a cluster bootstrap by prompt.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..adapters import WriteEdit
from . import stats
from .closed_form import _out_proj

PAPER = {"ranks 100-1000, m = 3, n = 3 positions": {"baseline": 0.333, "installed": 1.0, "trials": 300,
                                                       "independent_pairs": 60}}


@dataclass
class InstallConfig:
    layer: int
    head: int
    strata: tuple[tuple[int, int], ...] = ((10, 50), (50, 200))  # initial-rank ranges [lo, hi)
    targets_per_stratum: int = 2
    multipliers: tuple[float, ...] = (3.0,)
    n_positions: int = 3
    mode: str = "replace"  # or "add"
    write_mode: str = "raw"
    max_new_tokens: int = 20
    seed: int = 0

    def __post_init__(self):
        if self.mode not in ("replace", "add"):
            raise ValueError(f"mode must be 'replace' or 'add', got {self.mode!r}")
        if self.n_positions < 1 or self.max_new_tokens < 1 or self.targets_per_stratum < 1:
            raise ValueError("n_positions, max_new_tokens and targets_per_stratum must be >= 1")
        if any(lo < 0 or hi <= lo for lo, hi in self.strata):
            raise ValueError(f"strata must be [lo, hi) rank ranges with 0 <= lo < hi, got {self.strata}")


@dataclass
class InstallResult:
    config: dict
    records: list[dict]
    summary: dict


def target_direction(model, layer: int, head: int, token: int) -> Tensor:
    """``normalize(W_O[:, head]^T W_U[token])`` ``[d_v]``."""
    mixer = model.family.mixers[layer]
    dv = model.cfg.d_v
    W_O = _out_proj(mixer, model.cfg.d_model, model.cfg.n_heads * dv).weight[:, head * dv:(head + 1) * dv]
    w = W_O.float().T @ model.W_U[:, token].float()
    return w / w.norm().clamp(min=1e-12)


def _generate(model, prompt: Tensor, rows: int, max_new_tokens: int) -> Tensor:
    pad = model.tokenizer.pad_token_id if model.tokenizer is not None and model.tokenizer.pad_token_id is not None \
        else 0
    out = model.hf_model.generate(input_ids=prompt.expand(rows, -1), attention_mask=torch.ones(rows, prompt.shape[1],
                                  dtype=torch.long, device=prompt.device), max_new_tokens=max_new_tokens,
                                  min_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad,
                                  output_logits=True, return_dict_in_generate=True)
    # raw first-step logits (generation's processed scores would e.g. mask EOS under min_new_tokens)
    return out.sequences[:, prompt.shape[1]:], out.logits[0]


@torch.no_grad()
def run_install(model, prompts: Tensor, cfg: InstallConfig, progress: bool = True) -> InstallResult:
    """The install experiment on prompts ``[N, T]`` (each prompt is one cluster)."""
    if cfg.layer not in model.cfg.recurrent_layers:
        raise ValueError(f"layer {cfg.layer} is not recurrent; recurrent layers: {list(model.cfg.recurrent_layers)}")
    if not 0 <= cfg.head < model.cfg.n_heads:
        raise ValueError(f"head {cfg.head} out of range for {model.cfg.n_heads} value heads")
    N, T = prompts.shape
    if T < cfg.n_positions:
        raise ValueError(f"prompts of {T} tokens are shorter than n_positions={cfg.n_positions}")
    vocab = model.cfg.d_vocab
    if max(hi for _, hi in cfg.strata) > vocab:
        raise ValueError(f"a rank stratum exceeds the vocabulary size {vocab}")
    rng = np.random.default_rng(cfg.seed)
    p = model.hook_prefix(cfg.layer)
    positions = list(range(T - cfg.n_positions, T))
    records = []
    bar = tqdm(total=N, desc="install", disable=not progress)
    with model.options(write_mode=cfg.write_mode):
        for c in range(N):
            prompt = prompts[c:c + 1]
            _, cache = model.run_with_cache(prompt, names_filter=[p + "hook_write_key", p + "hook_write_value"])
            key = cache[p + "hook_write_key"][0, :, cfg.head]
            value = cache[p + "hook_write_value"][0, :, cfg.head]
            base_seq, base_scores = _generate(model, prompt, 1, cfg.max_new_tokens)
            base_logp = base_scores[0].float().log_softmax(-1)
            order = base_logp.argsort(descending=True)
            rank = torch.empty_like(order)
            rank[order] = torch.arange(vocab)
            targets = []
            for lo, hi in cfg.strata:
                pool = order[lo:hi].tolist()
                pick = rng.choice(len(pool), size=min(cfg.targets_per_stratum, len(pool)), replace=False)
                targets += [(int(pool[i]), (lo, hi)) for i in pick]
            for m in cfg.multipliers:
                edits = []
                for r, (tok, _) in enumerate(targets):
                    w = target_direction(model, cfg.layer, cfg.head, tok)
                    for t in positions:
                        scale = m * float(torch.outer(key[t], value[t]).norm())
                        A = scale * torch.outer(key[t] / key[t].norm().clamp(min=1e-12), w)
                        if cfg.mode == "replace":
                            edits.append(WriteEdit(layer=cfg.layer, pos=t, head=cfg.head, batch=r, matrix=A,
                                                   mode=cfg.write_mode))
                        else:
                            edits.append(WriteEdit(layer=cfg.layer, pos=t, head=cfg.head, batch=r, op="add", matrix=A))
                with model.edits(edits):
                    seqs, scores = _generate(model, prompt, len(targets), cfg.max_new_tokens)
                logp = scores.float().log_softmax(-1)
                for r, (tok, stratum) in enumerate(targets):
                    new_rank = int((logp[r] > logp[r, tok]).sum())
                    records.append({"prompt": c, "target": tok, "stratum": list(stratum), "multiplier": m,
                                    "initial_rank": int(rank[tok]), "installed_rank": new_rank,
                                    "baseline_hit": bool((base_seq[0] == tok).any()),
                                    "installed_hit": bool((seqs[r] == tok).any()),
                                    "logprob_lift": float(logp[r, tok] - base_logp[tok]),
                                    "continuation": seqs[r].tolist(), "baseline_continuation": base_seq[0].tolist()})
                    tk = model.tokenizer
                    if tk is not None:  # the text behind the ids, for the report
                        records[-1].update(prompt_text=tk.decode(prompt[0, -24:].tolist()),
                                           target_text=tk.decode([tok]),
                                           baseline_text=tk.decode(base_seq[0].tolist()),
                                           installed_text=tk.decode(seqs[r].tolist()))
            bar.update(1)
    bar.close()
    return InstallResult(config=asdict(cfg), records=records, summary=summarize(records, cfg))


def summarize(records: list[dict], cfg: InstallConfig) -> dict:
    out = {"by_multiplier": {}, "paper": PAPER}
    for m in cfg.multipliers:
        rows = [r for r in records if r["multiplier"] == m]
        block = {}
        for stratum in [None] + [list(s) for s in cfg.strata]:
            sub = [r for r in rows if stratum is None or r["stratum"] == stratum]
            if not sub:
                continue
            inst = [r["installed_hit"] for r in sub]
            base = [r["baseline_hit"] for r in sub]
            block["all" if stratum is None else f"rank {stratum[0]}-{stratum[1]}"] = {
                "independent_units": len(sub), "prompts": len({r["prompt"] for r in sub}),
                "baseline_rate": stats.wilson(sum(base), len(base)),
                "installed_rate": stats.wilson(sum(inst), len(inst)),
                "vs_baseline": stats.mcnemar(inst, base),  # same units with and without the install: paired
                "installed_rate_bootstrap_by_prompt": stats.cluster_bootstrap(inst, [r["prompt"] for r in sub]),
                "median_rank_shift": float(np.median([r["initial_rank"] - r["installed_rank"] for r in sub])),
                "mean_logprob_lift": float(np.mean([r["logprob_lift"] for r in sub])),
                "logprob_lift_wilcoxon": stats.paired_wilcoxon([0.0] * len(sub), [r["logprob_lift"] for r in sub]),
            }
        out["by_multiplier"][str(m)] = block
    return out


def figures(result: InstallResult) -> dict:
    from ..report import plt

    def curve():
        fig, ax = plt.subplots(figsize=(6, 4))
        ms = result.config["multipliers"]
        for key in next(iter(result.summary["by_multiplier"].values())):
            rates = [result.summary["by_multiplier"][str(m)][key]["installed_rate"] for m in ms]
            ax.errorbar(ms, [r["rate"] for r in rates], yerr=[[r["rate"] - r["lo"] for r in rates],
                                                             [r["hi"] - r["rate"] for r in rates]],
                        marker="o", capsize=3, label=f"installed, {key}")
            base = result.summary["by_multiplier"][str(ms[0])][key]["baseline_rate"]["rate"]
            ax.axhline(base, ls=":", lw=1, color=ax.lines[-1].get_color())
        ax.set_xlabel("install size m (x native write norm)")
        ax.set_ylabel("target in greedy continuation")
        ax.set_ylim(0, 1.05)
        ax.legend(fontsize=7)
        ax.set_title("install curve (dotted: baseline)")
        return fig

    def lift():
        fig, ax = plt.subplots(figsize=(6, 4))
        for m in result.config["multipliers"]:
            ax.hist([r["logprob_lift"] for r in result.records if r["multiplier"] == m], bins=20, alpha=0.5,
                    label=f"m = {m}")
        ax.set_xlabel("first-step log-prob lift of the target")
        ax.legend()
        return fig

    return {"install_curve": curve, "install_logprob_lift": lift}


def significance(block: dict) -> str:
    """How a stratum's installed-vs-baseline change reads: McNemar's exact p on the paired units, and "not
    significant" when p >= 0.05 (most demo-size runs: a few dozen units)."""
    v = block.get("vs_baseline")
    if not v:
        return ""
    word = "significant" if v["significant"] else "not significant"
    return f"{word}: {v['gained']} units gained, {v['lost']} lost, McNemar p = {v['p']:.2g}"


def save_install(result: InstallResult, out_dir, extra: dict | None = None):
    from ..report import fmt_rate, write_report

    notes = []
    for m, block in result.summary["by_multiplier"].items():
        a = block.get("all", {})
        notes.append(f"m = {m}: target in continuation {fmt_rate(a.get('installed_rate'))} installed vs "
                     f"{fmt_rate(a.get('baseline_rate'))} baseline over {a.get('independent_units')} independent "
                     f"(prompt, target) units from {a.get('prompts')} prompts ({significance(a)}).")
    notes.append("Paper: ranks 100-1000, 33.3% -> 100% (n = 300 trials, about 60 independent prompt-target pairs).")
    shown = sorted((r for r in result.records if "installed_text" in r),
                   key=lambda r: (not (r["installed_hit"] and not r["baseline_hit"]), -r["logprob_lift"]))
    examples = ("Prompts (their last 24 tokens), the target, and the greedy continuations without and with the "
                "install; rows where the install put the target in the continuation first.",
                [{"prompt": r["prompt_text"], "target": r["target_text"], "initial rank": r["initial_rank"],
                  "m": r["multiplier"], "baseline continuation": r["baseline_text"],
                  "installed continuation": r["installed_text"], "target appears": r["installed_hit"]}
                 for r in shown])
    return write_report(out_dir, "WriteSAE behavioural install",
                        {"experiment": "install", "config": result.config, "summary": result.summary,
                         **(extra or {})}, result.records, figures(result), notes, examples=examples)
