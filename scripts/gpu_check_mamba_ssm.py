"""GPU check of the adapters on the real kernels: mamba-ssm's ``MambaLMHeadModel`` (Mamba2 layers, triton
kernels) and, when fla is importable, a Qwen3.5 model on fla's kernels. Run on a CUDA machine; it is not
part of the CPU test suite (which covers the shared logic on ``tests/fake_mamba_ssm.py``).

    python scripts/gpu_check_mamba_ssm.py --out results_dir

Each check prints one line and the whole record goes to ``results_dir/gpu_check.json``:
* capture parity: hooked logits vs the unhooked model on its unfused path (the same triton kernels), and vs
  the fused path where mamba-ssm's fused kernel is available (it needs causal-conv1d);
* the stand-in: the real model's weights loaded into ``tests/fake_mamba_ssm.py`` on the CPU give the same
  logits, hooks and edit effects (so the CPU tests test what runs here);
* reference parity of ``hook_read`` and ``hook_state`` with the per-token recurrence; exact edits of writes
  and decays against it; prefill + decode through the cache with an edit against the full forward; bf16;
* timing: hooked forward (no capture / capturing the write factors of one layer) vs the unhooked forward
  (unfused, and fused where available), as ratios of medians over repeats in one run.
"""

from __future__ import annotations

import argparse
import copy
import importlib.machinery
import importlib.util
import os
import sys
import time
import types

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
from fake_mamba_ssm import unfused_copy  # noqa: E402  (the stand-in's helper: copy with the fused path off)
from gpu_checks import CheckRecord  # noqa: E402  (scripts/, the script's own folder)

RECORD = CheckRecord()
RESULTS = RECORD.results
RECORD.stub_wandb()
check = RECORD.check


def import_mamba_ssm():
    """Import mamba-ssm's Mamba2 model code. A pure-python build (no compiled extensions) lacks
    ``selective_scan_cuda``, the Mamba-1 CUDA extension that the package ``__init__`` imports and Mamba2 never
    calls: stand in an empty module for it, and skip the package ``__init__`` if it still fails."""
    if importlib.util.find_spec("selective_scan_cuda") is None:
        stub = types.ModuleType("selective_scan_cuda")
        stub.__spec__ = importlib.machinery.ModuleSpec("selective_scan_cuda", None)
        sys.modules["selective_scan_cuda"] = stub
        RESULTS["note_selective_scan_cuda"] = "stubbed (Mamba-1 extension; not used by Mamba2)"
    try:
        import mamba_ssm  # noqa: F401
    except Exception as e:  # e.g. Mamba3's optional kernels
        RESULTS["note_package_init"] = f"mamba_ssm/__init__ failed ({type(e).__name__}: {e}); imported submodules"
        for k in [k for k in sys.modules if k == "mamba_ssm" or k.startswith("mamba_ssm.")]:
            del sys.modules[k]
        spec = importlib.util.find_spec("mamba_ssm")
        pkg = types.ModuleType("mamba_ssm")
        pkg.__path__, pkg.__spec__ = list(spec.submodule_search_locations), spec
        sys.modules["mamba_ssm"] = pkg
    from mamba_ssm.models.config_mamba import MambaConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel
    return MambaConfig, MambaLMHeadModel


def rel(a, b) -> float:
    """``max|a - b| / max|b|`` (the kernels may use tf32 inside, so cross-kernel checks are relative)."""
    a, b = a.detach().float().cpu(), b.detach().float().cpu()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


TOL = 1e-2  # relative, for comparisons across different kernels (chunked triton vs per-token torch, tf32)


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def median_time(fn, repeats=7):
    fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--stand-in", action="store_true", help="dry run of this script on the CPU, with the stand-in "
                    "module playing the real package (checks the script, not mamba-ssm)")
    ap.add_argument("--gdn-only", action="store_true", help="only the Qwen3.5-on-fla check")
    args = ap.parse_args()
    dev = torch.device("cpu" if args.stand_in else "cuda")
    if args.gdn_only:
        gdn_on_fla(dev)
        return finish(args)
    RESULTS["env"] = {"torch": torch.__version__, "device": "stand-in on cpu" if args.stand_in
                      else torch.cuda.get_device_name(0)}
    if args.stand_in:
        import fake_mamba_ssm

        for name in ("mamba_ssm", "mamba_ssm.utils"):
            sys.modules[name] = types.ModuleType(name)
        sys.modules["mamba_ssm.utils.generation"] = fake_mamba_ssm

    @check("import")
    def _imp():
        import triton

        cfg_cls, lm_cls = import_mamba_ssm()
        from writesae_plugin.adapters import hook_model  # noqa: F401
        import mamba_ssm.modules.mamba2 as m2

        return {"triton": triton.__version__, "kernels": [n for n in ("mamba_chunk_scan_combined",
                "selective_state_update", "mamba_split_conv1d_scan_combined") if getattr(m2, n, None) is not None]}

    from fake_mamba_ssm import MambaConfig as FakeConfig, MambaLMHeadModel as FakeLM

    if args.stand_in:
        MambaConfig, MambaLMHeadModel = FakeConfig, FakeLM
    else:
        if not _imp()["ok"]:
            return finish(args)
        MambaConfig, MambaLMHeadModel = import_mamba_ssm()

    from writesae_plugin.adapters import StateCapture, WriteEdit, hook_model
    from writesae_plugin.adapters.mamba2 import mamba2_reference

    ssm = dict(layer="Mamba2", d_state=32, headdim=32, ngroups=2, chunk_size=64)
    cfg_kw = dict(d_model=256, n_layer=3, vocab_size=512, ssm_cfg=ssm, rms_norm=True, fused_add_norm=True,
                  residual_in_fp32=True, pad_vocab_size_multiple=8)
    torch.manual_seed(0)
    real = MambaLMHeadModel(MambaConfig(**cfg_kw), device=dev, dtype=torch.float32).eval()
    with torch.no_grad():
        for m in real.modules():
            if hasattr(m, "A_log"):
                m.D.normal_()
    ids = torch.randint(0, 512, (2, 150), generator=torch.Generator().manual_seed(0)).to(dev)
    pristine = copy.deepcopy(real)  # copies made before hooking (a deep copy of a hooked model carries its hooks)
    fused_ref = copy.deepcopy(real)
    plain = unfused_copy(real)
    model = hook_model(real)
    P = "blocks.1.mixer."

    @check("capture_parity_fp32")
    def _parity():
        with torch.no_grad():
            want = plain(ids).logits
            got, c = model.run_with_cache(ids)
            rec = {"bit_identical_to_unfused": bool(torch.equal(got, want)),
                   "max_abs_diff_unfused": float((got - want).abs().max())}
            try:
                rec["max_abs_diff_fused"] = float((got - fused_ref(ids).logits).abs().max())
            except Exception as e:
                rec["fused_path"] = f"unavailable here ({type(e).__name__}: {str(e)[:120]})"
        read, _ = mamba2_reference(*(c[P + n].cpu() for n in ("hook_write_key", "hook_write_value", "hook_log_decay",
                                                               "hook_query")))
        rec["read_vs_reference_rel"] = rel(c[P + "hook_read"], read)
        rec["mem_eff_flag_kept"] = all(b.mixer.use_mem_eff_path for b in real.backbone.layers)
        rec["ok"] = rec["bit_identical_to_unfused"] and rec["read_vs_reference_rel"] < TOL and rec["mem_eff_flag_kept"]
        return rec

    fake = FakeLM(FakeConfig(**cfg_kw)).eval()
    missing = fake.load_state_dict({k: v.cpu() for k, v in pristine.state_dict().items()}, strict=True)
    fmodel = hook_model(fake)
    ids_cpu = ids.cpu()

    @check("stand_in_matches_real")
    def _stand_in():
        with torch.no_grad():
            got, c = model.run_with_cache(ids)
            want, fc = fmodel.run_with_cache(ids_cpu)
        hooks = {n: rel(c[P + n], fc[P + n]) for n in ("hook_write_key", "hook_write_value", "hook_log_decay",
                                                        "hook_read")}
        d = rel(got, want)
        return {"load": str(missing), "logits_rel": d, "hooks_rel": hooks, "ok": d < TOL and max(hooks.values()) < TOL}

    edits = [WriteEdit(layer=1, pos=100, head=3, op="replace", key=torch.ones(32), value=torch.linspace(-2, 2, 32)),
             WriteEdit(layer=1, pos=40, head=5, batch=1, op="delete")]

    @check("exact_edits_vs_reference_and_stand_in")
    def _edits():
        with torch.no_grad():
            clean, c = model.run_with_cache(ids)
            with model.edits(edits):
                ed, e = model.run_with_cache(ids, names_filter=[P + "hook_read"])
            fclean = fmodel(ids_cpu)
            fed = fmodel.run_with_edits(ids_cpu, edits)
        k, v = c[P + "hook_write_key"].cpu(), c[P + "hook_write_value"].cpu()
        ref_edits = {(b, 100, 3): torch.outer(torch.ones(32), torch.linspace(-2, 2, 32)) for b in range(2)}
        ref_edits[(1, 40, 5)] = torch.zeros(32, 32)
        read, _ = mamba2_reference(k, v, c[P + "hook_log_decay"].cpu(), c[P + "hook_query"].cpu(), write_edits=ref_edits)
        err = rel(e[P + "hook_read"], read)
        eff, feff = (ed - clean).cpu(), fed - fclean
        r = float((eff - feff).norm() / feff.norm())
        prefix = bool(torch.equal(ed[0, :100], clean[0, :100]))
        return {"read_vs_reference_rel": err, "effect_rel_err_vs_stand_in": r, "prefix_untouched": prefix,
                "effect_norm": float(feff.norm()), "ok": err < TOL and r < TOL and prefix}

    @check("decode_with_edit_vs_full_forward")
    def _decode():
        e = [WriteEdit(layer=2, pos=130, head=1, op="delete"), WriteEdit(layer=0, pos=20, head=0, op="delete")]
        with torch.no_grad():
            full = model.run_with_edits(ids, e)
            cache = model.hf_model.new_cache(2, 160)
            with model.edits(e):
                steps = [model(ids[:, :120], past_key_values=cache)]
                for t in range(120, 150):
                    steps.append(model(ids[:, t:t + 1], past_key_values=cache))
            from mamba_ssm.utils.generation import InferenceParams
            own = InferenceParams(max_seqlen=160, max_batch_size=2)  # mamba-ssm's own cache type
            steps2 = [model(ids[:, :120], past_key_values=own)] + [model(ids[:, t:t + 1], past_key_values=own)
                                                                    for t in range(120, 150)]
            clean = model(ids)
        d, d2 = rel(torch.cat(steps, 1), full), rel(torch.cat(steps2, 1), clean)
        return {"edited_decode_vs_full_rel": d, "clean_decode_vs_full_own_InferenceParams_rel": d2,
                "ok": d < TOL and d2 < TOL}

    @check("decay_edit_and_state_capture_vs_reference")
    def _decay():
        def edit(x, hook):
            x[:, 60, 2] -= 3.0
            return x

        with torch.no_grad():
            with model.options(capture_states=StateCapture(positions=[70], heads=[2, 6])):
                _, c = model.run_with_cache(ids)
            with model.hooks(fwd_hooks=[(P + "hook_log_decay", edit)]):
                _, e = model.run_with_cache(ids, names_filter=[P + "hook_read"])
        k, v, g, q = (c[P + n].cpu() for n in ("hook_write_key", "hook_write_value", "hook_log_decay", "hook_query"))
        _, S = mamba2_reference(k[:, :71], v[:, :71], g[:, :71], q[:, :71])
        s_err = rel(c[P + "hook_state"][:, 0], S[:, [2, 6]])
        g2 = g.clone()
        g2[:, 60, 2] -= 3.0
        read, _ = mamba2_reference(k, v, g2, q)
        r_err = rel(e[P + "hook_read"], read)
        return {"state_vs_reference_rel": s_err, "decay_edit_read_vs_reference_rel": r_err,
                "ok": s_err < TOL and r_err < TOL}

    @check("bf16")
    def _bf16():
        rb = copy.deepcopy(pristine).to(torch.bfloat16)
        want = unfused_copy(rb)
        mb = hook_model(rb)
        with torch.no_grad():
            w = want(ids).logits
            g, c = mb.run_with_cache(ids, names_filter=[P + "hook_write_value"])
            ed = mb.run_with_edits(ids, edits[:1])
        return {"bit_identical_to_unfused": bool(torch.equal(g, w)), "edit_effect_norm": float((ed - g).float().norm()),
                "write_value_dtype": str(c[P + "hook_write_value"].dtype), "ok": bool(torch.equal(g, w))}

    for f in (_parity, _stand_in, _edits, _decode, _decay, _bf16):
        f()
    if not args.skip_speed:
        speed(MambaConfig, MambaLMHeadModel, hook_model, dev)
    if not args.stand_in:
        gdn_on_fla(dev)
    finish(args)


@check("speed_bf16")
def speed(MambaConfig, MambaLMHeadModel, hook_model, dev):
    """A Mamba-2-370M-shaped stack (d_model 1024, d_state 128, headdim 64), 8 of its 48 layers, b=4, T=2048."""
    from writesae_plugin.adapters import WriteEdit

    if dev.type == "cpu":
        return {"skipped": "no timing on the stand-in"}
    cfg = MambaConfig(d_model=1024, n_layer=8, vocab_size=50280, ssm_cfg=dict(layer="Mamba2", d_state=128, headdim=64,
                      ngroups=1, chunk_size=256), rms_norm=True, fused_add_norm=True, residual_in_fp32=True)
    torch.manual_seed(0)
    m = MambaLMHeadModel(cfg, device=dev, dtype=torch.bfloat16).eval()
    ids = torch.randint(0, 50000, (4, 2048), device=dev)
    plain = unfused_copy(m)
    rec = {}
    with torch.no_grad():
        rec["unhooked_unfused_s"] = median_time(lambda: plain(ids))
        try:
            rec["unhooked_fused_s"] = median_time(lambda: m(ids))
        except Exception as e:
            rec["unhooked_fused_s"] = f"unavailable ({type(e).__name__})"
        model = hook_model(m)
        rec["hooked_s"] = median_time(lambda: model(ids))
        rec["hooked_capture_factors_s"] = median_time(lambda: model.run_with_cache(
            ids, names_filter=["blocks.4.mixer.hook_write_key", "blocks.4.mixer.hook_write_value"]))
        e = [WriteEdit(layer=4, pos=1000, head=3, op="delete")]
        rec["hooked_one_edit_s"] = median_time(lambda: model.run_with_edits(ids, e))
    base = rec["unhooked_unfused_s"]
    for k in ("hooked_s", "hooked_capture_factors_s", "hooked_one_edit_s"):
        rec[k.replace("_s", "_ratio_vs_unfused")] = round(rec[k] / base, 3)
    return rec


@check("gdn_on_fla")
def gdn_on_fla(dev):
    """Qwen3.5 on fla's triton kernels (when fla imports): hooked == unhooked, and edits == the CPU torch path."""
    if importlib.util.find_spec("fla") is None:
        return {"ok": True, "skipped": "fla not installed"}
    from transformers import AutoModelForCausalLM

    from tiny_models import tiny_config
    from writesae_plugin.adapters import WriteEdit, hook_model

    torch.manual_seed(0)
    cfg = tiny_config("qwen3_5", n_layers=4)
    cpu_model = AutoModelForCausalLM.from_config(cfg).eval()
    gpu_model = copy.deepcopy(cpu_model).to(dev)
    ids = torch.randint(0, 256, (2, 80), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = gpu_model(input_ids=ids.to(dev)).logits
        mod = sys.modules[type(gpu_model).__module__]
        kernel = getattr(mod, "torch_chunk_gated_delta_rule", None)
        hm, hc = hook_model(gpu_model), hook_model(cpu_model)
        layer = hm.cfg.recurrent_layers[1]
        got = hm(ids.to(dev))
        e = [WriteEdit(layer=layer, pos=50, head=1, op="delete")]
        ed, edc = hm.run_with_edits(ids.to(dev), e), hc.run_with_edits(ids, e)
        clean_c = hc(ids)
    eff, effc = (ed - got).cpu(), edc - clean_c
    r = float((eff - effc).norm() / effc.norm())
    return {"kernel": getattr(getattr(kernel, "__wrapped_by_writesae__", kernel), "__module__", "?"),
            "bit_identical_to_unhooked": bool(torch.equal(got, plain)),
            "max_abs_diff_vs_unhooked": float((got - plain).abs().max()),
            "edit_effect_rel_err_vs_cpu_torch": r, "ok": bool(torch.equal(got, plain)) and r < TOL}


def finish(args):
    RECORD.write_json(os.path.join(args.out, "gpu_check.json"))
    bad = RECORD.failed()
    print(f"{len(bad)} failed: {bad}" if bad else "all checks passed", flush=True)


if __name__ == "__main__":
    main()
