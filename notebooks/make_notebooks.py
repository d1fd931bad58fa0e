"""Regenerate the tutorial notebooks (clean: no outputs). Run: python notebooks/make_notebooks.py

This file is the notebooks' source: edit it, not the .ipynb files (tests/test_demo.py checks they agree)."""

from pathlib import Path

import nbformat as nbf

HERE = Path(__file__).parent


def nb(cells):
    book = nbf.v4.new_notebook()
    book.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    book.cells = [nbf.v4.new_markdown_cell(c[3:]) if c.startswith("md:") else nbf.v4.new_code_cell(c.strip())
                  for c in cells]
    for i, cell in enumerate(book.cells):
        cell.id = f"cell-{i:02d}"  # stable ids: regenerating changes only what the sources change
    return book


SETUP = """
import torch
import writesae_plugin  # registers the WriteSAE architecture and the shipped release with SAELens
from writesae_plugin.demo.run import demo_model_dir, held_out_contexts
from transformers import AutoModelForCausalLM, AutoTokenizer
from writesae_plugin.adapters import hook_model

path = demo_model_dir()  # the shipped demo model: a small Qwen3.5 trained on the Python standard library
hf = AutoModelForCausalLM.from_pretrained(path).eval()
tok = AutoTokenizer.from_pretrained(path)
model = hook_model(hf, tokenizer=tok)
tokens = held_out_contexts(tok, 4, 64)  # held-out stdlib files
print(model.cfg.family, "recurrent layers", model.cfg.recurrent_layers, "d_k", model.cfg.d_k, "d_v", model.cfg.d_v)
"""

QUICKSTART = nb([
    "md:# Quickstart: write hook points, nnsight, and a WriteSAE through SAELens\n\n"
    "The demo model ships with the package, so this runs offline on a CPU.",
    SETUP,
    "md:Every Gated DeltaNet layer exposes its cache write as factors, the dense write on request, the state "
    "on request, and the read. The inventory lists shapes and edit semantics.",
    """
for name, desc in model.hook_inventory()[:12]:
    print(f"{name:40s} {desc}")
""",
    """
logits, cache = model.run_with_cache(tokens, names_filter=lambda n: n.startswith("blocks.2.") and "hook_write_" in n)
key, value = cache["blocks.2.linear_attn.hook_write_key"], cache["blocks.2.linear_attn.hook_write_value"]
print(key.shape, value.shape)  # [batch, pos, value heads, d_k], [batch, pos, value heads, d_v]
assert torch.equal(logits, hf(input_ids=tokens).logits)  # hooks leave the model's output bit-identical
""",
    "md:The same hook points through nnsight:",
    """
from nnsight import NNsight
nn_model = NNsight(model)
with torch.no_grad(), nn_model.trace(tokens):
    k = nn_model.blocks[2].linear_attn.hook_write_key.output.save()
assert torch.equal(k, key)
""",
    "md:Load the shipped WriteSAE (trained on the layer-2, head-1 state) from the SAELens registry and "
    "splice it into `hook_state`. With the error term the logits are unchanged bit for bit.",
    """
from sae_lens import SAE
from writesae_plugin.adapters import StateCapture
sae = SAE.from_pretrained("writesae-demo", "L2.H1.state")
print(writesae_plugin.sae.describe(sae))
with model.options(capture_states=StateCapture("all")):
    _, c = model.run_with_cache_with_saes(tokens, saes=[sae], use_error_term=True)
    acts = c["blocks.2.linear_attn.hook_state.hook_sae_acts_post"]
print("codes", acts.shape, "mean L0", (acts > 0).sum(-1).float().mean().item())
""",
])

SUBSTITUTION = nb([
    "md:# The substitution test and the closed-form logit shift\n\n"
    "Replace a write by its dominant atom and compare with deleting it; then predict logit shifts of atom "
    "installs with three separately reported predictors.",
    SETUP,
    """
from sae_lens import SAE
from writesae_plugin.experiments.substitution import SubstitutionConfig, run_substitution
sae = SAE.from_pretrained("writesae-demo", "L2.H1.state")
res = run_substitution(model, sae, tokens, SubstitutionConfig(max_firings=12, max_per_context=3))
head = res.summary["headline"]
print(f"atom_act beats delete in {head['k']}/{head['n']} firings, Wilson 95% [{head['lo']:.2f}, {head['hi']:.2f}]")
""",
    """
for cond, s in res.summary["by_metric"]["kl_final"].items():
    if isinstance(s, dict) and "win" in s:
        print(f"{cond:16s} win rate vs delete {s['win']['rate']:.2f} (n={s['win']['n']})")
""",
    """
from writesae_plugin.experiments.closed_form import ClosedFormConfig, run_closed_form
atom = max(set(f["atom"] for f in res.firings), key=[f["atom"] for f in res.firings].count)
cf = run_closed_form(model, sae, tokens[:, :48], ClosedFormConfig(atoms=[atom], t0=12))
for name, v in cf.summary["pooled"].items():
    print(f"{name:9s} R2 = {v['r2']:.3f}  sign agreement = {v['sign_agreement']:.2f}  (n={v['n']})")
print("fit records:", cf.summary["n_fit"], "evaluation records:", cf.summary["n_eval"])
""",
    "md:How to read these: each R² compares a predictor with the measured logit shifts on the evaluation "
    "contexts (1 = exact, 0 = no better than predicting their mean, negative = worse than the mean). `jvp` is the "
    "exact first-order response through the whole model: R² near 1 says the shift is linear at this size. "
    "`direct` is parameter-free and keeps only the path through this head's output projection, the norms and the "
    "unembedding (no later layers). `fitted_g` is the paper's three-factor form with one gain G per (atom, token) "
    "fitted on the other half of the contexts: here 2 contexts fit it and 2 evaluate it, so a strongly negative "
    "R² means gains fitted on two contexts do not transfer to two others (the paper fitted G per prompt, i.e. in "
    "sample). Sign agreement is the share of shifts whose sign the predictor gets right, among the predictions "
    "that are not exactly 0 (`zero_predictions` is the share that are). By horizon:",
    """
for b in cf.summary["by_horizon"]:
    print(f"t - t0 in {b['horizon']}: " + ", ".join(f"{k} R2 {b[k]:.2f}" for k in ("jvp", "direct", "fitted_g"))
          + f" (n={b['n']})")
""",
    "md:What this run shows: the first-order response is exact (jvp R² 1.00 at every horizon). The direct "
    "path is exactly 0 wherever this head's state has already forgotten the edit (the product of its decays "
    "underflows; in the demo's closed-form run that is 94% of the records): there the whole measured shift is "
    "carried by the paths through later layers, which the jvp includes and the direct path leaves out. The fitted-G "
    "R² of about -1,200 comes from the shortest horizons (t - t0 = 1, n = 10, R² about -4,300; t - t0 = 2-3, "
    "about -10), where the largest shifts are and gains fitted on two contexts miss them; from t - t0 = 4 on it is "
    "between -0.1 and 0, no better than the mean. The paper's 0.98 was fitted per prompt, in sample.",
])

INSTALL = nb([
    "md:# Steering by install\n\nInstall `k_t w*_T^T` (value side aimed at a target token through `W_O` and `W_U`) "
    "at the last three prompt positions, then decode greedily: the install lives in the recurrent state.",
    SETUP,
    "md:Target ` None` at the last recurrent layer (layer 5, head 0), 3x the native write norm. First the "
    "next-token distribution: where does the target rank before and after the install?",
    """
from writesae_plugin.adapters import WriteEdit
from writesae_plugin.experiments.install import target_direction
prompt = tokens[:1, :40]
target = tok.convert_tokens_to_ids("ĠNone")
layer, head = 5, 0
p = model.hook_prefix(layer)
_, c = model.run_with_cache(prompt, names_filter=[p + "hook_write_key", p + "hook_write_value"])
key, value = c[p + "hook_write_key"][0, :, head], c[p + "hook_write_value"][0, :, head]
w = target_direction(model, layer, head, target)

def install(m):
    return [WriteEdit(layer=layer, pos=t, head=head, matrix=m * torch.outer(key[t], value[t]).norm()
                      * torch.outer(key[t] / key[t].norm(), w)) for t in (37, 38, 39)]

with torch.no_grad():
    before = model(prompt)[0, -1].log_softmax(-1)
    after = model.run_with_edits(prompt, install(3.0))[0, -1].log_softmax(-1)
rank = lambda lp: int((lp > lp[target]).sum())
print(f"' None': log-prob {before[target]:.2f} -> {after[target]:.2f}, rank {rank(before)} -> {rank(after)}")
""",
    "md:The install moves the target up the ranking (the first-step log-prob lift is what `writesae install` "
    "reports), but on this 4M-parameter model one head's write rarely decides the greedy token: the continuation "
    "at m = 3 is the baseline's. A larger install changes the text (here the list ends and a method follows), "
    "though not into the target: the lift is real, greedy decoding only shows it when the target gets to rank 0.",
    """
base = model.generate(prompt, max_new_tokens=12)
print("baseline:      ", repr(tok.decode(base[0, 40:])))
for m in (3.0, 20.0):
    with model.edits(install(m)):
        steered = model.generate(prompt, max_new_tokens=12)
    print(f"installed m={m:<4}", repr(tok.decode(steered[0, 40:])))
""",
    "md:The experiment over prompts and random mid-ranked targets (target-in-continuation rate with Wilson "
    "intervals, baseline vs installed, at layer 5 head 0). On these two prompts with two targets each, the target "
    "appears in no continuation either way (0 of 4, Wilson upper bound 49%) and the mean first-step lift is about "
    "zero: the example above is a favourable one. On this small model single-head installs move ranks, rarely "
    "greedy text; `writesae demo` measures the rate on more prompts (its install report lists each prompt with "
    "both continuations).",
    """
from writesae_plugin.experiments.install import InstallConfig, run_install
res = run_install(model, tokens[:2, :40], InstallConfig(layer=5, head=0, strata=((10, 100),), max_new_tokens=8),
                  progress=False)
a = res.summary["by_multiplier"]["3.0"]["all"]
print("installed", a["installed_rate"])
print("baseline ", a["baseline_rate"])
print("mean first-step log-prob lift", round(a["mean_logprob_lift"], 3))
""",
])

TRAINING = nb([
    "md:# Training a WriteSAE on your own model\n\nShown on the shipped model; for a hub model replace the "
    "loading lines, e.g. `AutoModelForCausalLM.from_pretrained(\"Qwen/Qwen3.5-0.8B\")` (downloads weights), "
    "and choose a layer and value head. The write site trains on the factors (k, beta v) and never forms "
    "the d_k x d_v write.",
    SETUP,
    """
import tempfile
from writesae_plugin.data import ActivationProvider, SiteSpec, token_contexts
from writesae_plugin.demo import corpus
from writesae_plugin.sae import WriteSAETrainingConfig
from writesae_plugin.train import train_write_sae

spec = SiteSpec(layer=2, site="write", heads=[1], positions="all", layout="factors")
contexts = token_contexts(corpus.texts("train"), tok, 64)
provider = ActivationProvider(model, contexts, spec, batch_size=128, normalize=True)
val = [next(ActivationProvider(model, iter(tokens), spec, batch_size=128, buffer_batches=2))]
cfg = WriteSAETrainingConfig(d_in=model.cfg.d_k * model.cfg.d_v, d_sae=128, d_k=model.cfg.d_k, d_v=model.cfg.d_v,
                             k=8, site="write", head=1, n_heads=model.cfg.n_heads, layer=2, family=model.cfg.family,
                             input_layout="factors", aux_k=64)
cfg.metadata.hook_name = "blocks.2.linear_attn.hook_write"
out = tempfile.mkdtemp()
sae, history = train_write_sae(cfg, provider, out, total_samples=128 * 60, batch_size=128, lr=3e-3,
                               val_batches=val, val_every=30)
for row in history:
    print(row)
""",
    """
from sae_lens import SAE
trained = SAE.load_from_disk(out + "/final")
print(writesae_plugin.sae.describe(trained))
""",
    "md:The same from the command line: `writesae train --model Qwen/Qwen3.5-0.8B --layer 9 --head 4 --site state "
    "--dataset <text files or hub dataset> --out my_sae`.",
])

PAIRS = """
from writesae_plugin.circuits.tasks import quote_task
from writesae_plugin.demo import corpus

# quote pairs: a held-out stdlib prefix, then `x = f(` + a quote + two words. The clean prompt opens the string
# with ', the corrupted one with ". Metric: logit(') - logit(") at the last position (which quote closes it).
pairs = quote_task(tok, corpus.texts("test"), n=6, length=20)
metric = pairs.metric()
print(len(pairs), "pairs; clean", float(metric(model(pairs.clean))), "corrupted", float(metric(model(pairs.corrupted))))
"""

ACTIVATION_PATCHING = nb([
    "md:# Activation patching of cache writes and WriteSAE atoms\n\n"
    "TransformerLens' own `generic_activation_patch` runs unchanged on the write hooks (the adapter answers to "
    "the layer-level names `blocks.{l}.hook_write` that `get_act_name` builds; `write_patch_index` skips the "
    "attention layer of this hybrid). `patch_writes` gives the same numbers, batched and resumed at each layer; "
    "`patch_atoms` patches one atom's contribution, or the SAE's error node.",
    SETUP, PAIRS,
    """
from transformer_lens import patching
from writesae_plugin.circuits import patch_writes, patch_atoms, write_patch_index, logit_diff
layer = 4  # where the quote memory is written (see `writesae patch`)
with torch.no_grad(), model.options(materialize_writes=True):
    _, clean_cache = model.run_with_cache(pairs.clean, names_filter=lambda n: n.endswith("hook_write"))
    index = write_patch_index(model, pairs.clean.shape[1], layers=[layer])
    tl_scores = patching.generic_activation_patch(model, pairs.corrupted, clean_cache, metric,
                                                  patching.layer_pos_head_vector_patch_setter, "write", index_df=index)
ours = patch_writes(model, pairs.clean, pairs.corrupted, pairs.metric(per_prompt=True), layers=[layer], progress=False)
print("max |TL - ours|:", float((tl_scores - ours.scores.flatten()).abs().max()))
print("normalised score one token after the quote, per head:", ours.normalized[0, pairs.source_pos + 1])
print("effect of head 0 one token after the quote, 95% CI over prompts:", ours.effect_interval(0, pairs.source_pos + 1, 0))
""",
    "md:Now the atoms of the shipped layer-4 write SAE, and its error node, patched clean into corrupted at the "
    "positions from the quote on. Each atom is labelled by the tokens its value side promotes as the head reads "
    "it (`circuits.run.atom_labels`).",
    """
from sae_lens import SAE
from writesae_plugin.circuits.run import atom_labels
sae = SAE.from_pretrained("writesae-demo", "L4.H0.write")
atoms = patch_atoms(model, sae, pairs.clean, pairs.corrupted, metric, positions=list(range(pairs.source_pos, pairs.clean.shape[1])), max_atoms=8,
                    progress=False)
labels = atom_labels(model, sae, pairs.clean, [a for a in atoms.index["atom"] if a != "error"])
print(f"metric: clean {atoms.clean:+.3f}, corrupted {atoms.corrupted:+.3f} (gap {atoms.clean - atoms.corrupted:.3f})")
for row, pos in enumerate(atoms.index["pos"]):
    eff = atoms.scores[row] - atoms.corrupted
    print(f"position {pos} ({pos - pairs.source_pos} after the quote):")
    for i in eff.abs().argsort(descending=True)[:4].tolist():
        name = atoms.index["atom"][i]
        print(f"   {str(name):>6} {float(eff[i]):+.3f}  {labels.get(name, '(the SAE error: what no atom explains)')}")
""",
    "md:At the quote itself no atom moves the metric. One token later, where `writesae patch` finds the quote "
    "memory written, the error node restores most of the clean-corrupted gap (+4.7 of 6.9) and each atom under "
    "5% of it. The largest atom (118: ` =`, `')`, `']`) promotes tokens that close a single-quoted string: the "
    "right kind of atom, but small. These SAEs have no strong atom for the open quote, so the error node is where "
    "that information sits (the README's circuit paragraph says the same).",
    "md:CLI: `writesae patch --out DIR` (shipped model, release and task by default).",
])

ATTRIBUTION_PATCHING = nb([
    "md:# Attribution patching of writes, atoms and error nodes\n\n"
    "Gradient x delta from one forward and backward pass of the corrupted run, through the adapter's exact adjoint, "
    "TransformerLens hooks, or an nnsight trace, checked against actual patching.",
    SETUP, PAIRS,
    """
from sae_lens import SAE
from writesae_plugin.circuits import attribute_writes, attribute_atoms, patch_writes, patch_atoms, compare_with_patching
layer = 4  # where the quote memory is written (see `writesae patch`)
est = attribute_writes(model, pairs.clean, pairs.corrupted, metric, layers=[layer])
act = patch_writes(model, pairs.clean, pairs.corrupted, metric, layers=[layer], progress=False)
print("writes:", compare_with_patching(est, act))
sae = SAE.from_pretrained("writesae-demo", "L4.H0.write")
actual = patch_atoms(model, sae, pairs.clean, pairs.corrupted, metric, positions=list(range(pairs.source_pos, pairs.clean.shape[1])), max_atoms=8,
                     progress=False)
for backend in ("adjoint", "transformer_lens", "nnsight"):
    estimate = attribute_atoms(model, sae, pairs.clean, pairs.corrupted, metric, positions=list(range(pairs.source_pos, pairs.clean.shape[1])),
                               atoms=actual.index["atom"][:-1], backend=backend)
    print(backend, compare_with_patching(estimate, actual))
""",
    "md:CLI: `writesae attribution-patch --out DIR`.",
])

PATH_PATCHING = nb([
    "md:# Path patching through the recurrence\n\n"
    "A write's effect restricted to chosen reads (positions, heads) or mediated by a chosen later hook.",
    SETUP, PAIRS,
    """
from writesae_plugin.adapters import WriteEdit
from writesae_plugin.circuits import path_patch, Reads
layer, h, s = 4, 0, pairs.source_pos
p = model.hook_prefix(layer)
_, c = model.run_with_cache(pairs.clean, names_filter=[p + "hook_write_key", p + "hook_write_value"])
sender = [WriteEdit(layer=layer, pos=s, head=h, key=c[p + "hook_write_key"][b, s, h],
                    value=c[p + "hook_write_value"][b, s, h], batch=b) for b in range(len(pairs))]
for t in range(s, pairs.clean.shape[1]):
    r = path_patch(model, pairs.corrupted, sender, [Reads(layer, positions=(t,), heads=(h,))], metric)
    print(f"via read {t}: {r['path'] - r['base']:+.4f} of total {r['total'] - r['base']:+.4f}")
r = path_patch(model, pairs.corrupted, sender, ["blocks.4.hook_write_value"], metric)
print("mediated by layer 4's write values:", r)
""",
    "md:CLI: `writesae path-patch --out DIR [--layer L --head H]`.",
])

CIRCUITS = nb([
    "md:# A sparse feature circuit over write and state atoms, then ACDC\n\n"
    "Nodes: atoms and error nodes of the shipped write and state SAEs (layer 4, head 0); node and edge effects by "
    "attribution patching; ACDC then prunes by exact ablation and reports faithfulness.",
    SETUP, PAIRS,
    """
from sae_lens import SAE
from writesae_plugin.circuits import feature_circuit, acdc_prune
sae = SAE.from_pretrained("writesae-demo", "L4.H0.write")
sae_state = SAE.from_pretrained("writesae-demo", "L4.H0.state")
circ = feature_circuit(model, [sae, sae_state], pairs.clean, pairs.corrupted, metric, node_threshold=0.02,
                       edge_threshold=0.01, max_nodes_per_sae=5, progress=False)
print(len(circ.nodes), "nodes", len(circ.edges), "edges")
pruned = acdc_prune(model, [sae, sae_state], pairs.clean, pairs.corrupted, metric, threshold=0.05, circuit=circ,
                    progress=False)
print("ACDC keeps", pruned.node_ids(), "faithfulness", round(pruned.metric["faithfulness"], 3))
print(circ.to_json()[:300])
circ.figure();
""",
    "md:CLI: `writesae circuit --out DIR` writes `circuit.json`, `circuit_acdc.json` and the figures.",
])

EDITING = nb([
    "md:# SHIFT-style editing: ablate atoms, against random atom sets\n\n"
    "The atoms with the largest attribution to the quote-matching behaviour are ablated on the clean prompts; the change "
    "is compared with random atom sets of the same size.",
    SETUP, PAIRS,
    """
from sae_lens import SAE
from writesae_plugin.circuits import attribute_atoms, edit_atoms
sae = SAE.from_pretrained("writesae-demo", "L4.H0.write")
est = attribute_atoms(model, sae, pairs.clean, pairs.corrupted, metric, positions=list(range(pairs.source_pos, pairs.clean.shape[1])), include_error=False)
top = [est.index["atom"][i] for i in (est.scores - est.corrupted).sum(0).argsort(descending=True)[:2].tolist()]
res = edit_atoms(model, sae, pairs.clean, pairs.metric(per_prompt=True), atoms=top, n_controls=5, progress=False)
print("atoms", res["atoms"], "before", res["before"], "after", res["after"])
print("random sets:", res["controls"])
""",
    "md:CLI: `writesae edit-atoms --out DIR [--atoms ...]`.",
])

DASHBOARDS = nb([
    "md:# Atom dashboards: what one atom of a write SAE means, from its page data\n\n"
    "`writesae dashboard` (and `writesae demo`, for every shipped SAE) writes a static site and a documented JSON "
    "per atom. Here we compute the dashboard of the shipped layer-4, head-0 write SAE on the same 16 held-out "
    "contexts the demo uses, then open one atom's page data in Python.",
    SETUP,
    """
import tempfile, json
from sae_lens import SAE
from writesae_plugin.dashboard import ATOM_SCHEMA, DashboardConfig, compute_dashboard, load_atom, write_dashboard

sae = SAE.from_pretrained("writesae-demo", "L4.H0.write")
ctx = held_out_contexts(tok, 48, 128)[:16]  # the demo's dashboard contexts
data = compute_dashboard(model, sae, ctx, DashboardConfig(atoms=[313], value_firings=4, effect_firings=4),
                         progress=False)
out = tempfile.mkdtemp()
index = write_dashboard(data, out, tok, title="writesae-demo:L4.H0.write", progress=False)
print("site:", index)
print(f"{int((data.stats.fires > 0).sum())} of {sae.cfg.d_sae} atoms fire on these {ctx.numel()} positions")
""",
    "md:Every atom has a JSON record (`data/atoms/{i}.json`); `ATOM_SCHEMA` says what each field holds.",
    """
for key in ("fires", "density", "top_contexts", "key_side", "value_side", "effect", "curves"):
    print(f"{key:13s} {ATOM_SCHEMA[key][:100]}")
atom = load_atom(out, 313)
print(f"\\natom 313 fires at {atom['fires']} of {atom['positions']} positions (density {atom['density']:.3f}), "
      f"max activation {atom['max_act']:.1f}")
""",
    "md:**Where it fires.** The strongest firings, with the firing token in brackets and the eight tokens "
    "before it: words of docstring prose, i.e. positions inside a string opened by triple double quotes.",
    """
for c in atom["top_contexts"][:6]:
    left = "".join(c["tokens"][c["center"] - 8:c["center"]])
    print(f"{c['act']:6.2f}  {left!r:>48} [{c['tokens'][c['center']]}]")
""",
    "md:**Key side** (`u . k_t`: whose write keys look like the atom's address) and **value side** (the "
    "logits the atom adds through its head's output, read with the sign of `q . u` and through the norms at "
    "its firings). The value side promotes tokens that close a double-quoted string (`\":`, `\",`, `\".`).",
    """
print("key side, largest u.k:", [(k["token"], round(k["value"], 2)) for k in atom["key_side"]["top"][:6]])
print("value side promotes:  ", [(t, round(v, 4)) for t, v in atom["value_side"]["norms"]["top"][:5]])
print("value side suppresses:", [(t, round(v, 4)) for t, v in atom["value_side"]["norms"]["bottom"][:5]])
""",
    "md:**What substituting it does.** At each of its four strongest firings the write is replaced by the atom "
    "at its activation, and separately deleted. The atom's substitution moves the next-token distribution less "
    "than deleting the write (KL) at each of them, though not by much, and it raises the same double-quote closers "
    "the value side predicts: the "
    "value side is a prediction from the weights, the effect is measured on the model.",
    """
e = atom["effect"]
print(f"atom beats delete at {e['win']['k']} of {e['n']} firings (Wilson 95% [{e['win']['lo']:.2f}, {e['win']['hi']:.2f}])")
for r in e["records"]:
    print(f"  at {r['token']!r:8} KL(atom) {r['kl_atom']:.4f}  KL(delete) {r['kl_delete']:.4f}  raises {r['top'][0]}")
print("mean logit change, top:", [(t, round(v, 2)) for t, v in e["mean_dlogit_top"][:4]])
""",
    "md:**Its life in the state.** After a firing the head's decay shrinks what the atom wrote; the curve is "
    "the mean decay `exp(G_{t+d} - G_t)` over its firings (the page's figure also shows the histogram).",
    """
d = atom["curves"]["decay"]
print("decay after d positions:", {k: round(d[k], 3) for k in (1, 2, 4, 8, 16, 32) if k < len(d)})
from IPython.display import Image
Image(filename=f"{out}/figures/atom_313.png")
""",
    "md:CLI: `writesae dashboard --model M --sae S --dataset D --out R` (add `--neuronpedia DIR` for "
    "Neuronpedia's upload format); open `R/index.html` in a browser.",
])

BOOKS = {"01_quickstart.ipynb": QUICKSTART, "02_substitution_and_closed_form.ipynb": SUBSTITUTION,
         "03_steering_by_install.ipynb": INSTALL, "04_training_a_writesae.ipynb": TRAINING,
         "05_activation_patching.ipynb": ACTIVATION_PATCHING,
         "06_attribution_patching.ipynb": ATTRIBUTION_PATCHING, "07_path_patching.ipynb": PATH_PATCHING,
         "08_feature_circuits_and_acdc.ipynb": CIRCUITS, "09_editing_atoms.ipynb": EDITING,
         "10_atom_dashboards.ipynb": DASHBOARDS}

if __name__ == "__main__":
    for name, book in BOOKS.items():
        nbf.write(book, HERE / name)
