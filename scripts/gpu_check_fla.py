"""GPU check of the flash-linear-attention adapters (issue 15) on fla's own triton kernels: DeltaNet, GLA, RWKV-7.
Run on a CUDA machine with the ``[fla]`` extra; it is not part of the CPU test suite (which runs fla's layer code
with its kernels routed to torch).

    python scripts/gpu_check_fla.py --out results_dir [--families rwkv7,gla,delta_net]

For each family, on the tiny model of ``tests/tiny_fla_models.py`` moved to the GPU, one line per check and the
whole record in ``results_dir/gpu_check_fla.json``:
* capture: hooked logits == the unhooked model's (the same fla kernels: bit for bit), with autograd off and on;
* reference: every layer's ``hook_read`` against the family's per-token reference on the captured factors (on the
  CPU, fp32), relative to the reads' scale;
* edit: a ``WriteEdit`` (propagated by fla's own kernels, zero-value trick) against the reference with the edit;
  positions before it and the other row unchanged exactly;
* decode: prefill + single-token decode with the edit against the full forward with the edit;
* CPU vs GPU: the same model's logits on the CPU path (torch kernels) and on the GPU path;
* timing: hooked / unhooked forward (medians of 5, b = 4, T = 1024, after a warm-up for triton's JIT).

``--device cpu`` is a dry run of the script itself (every model on the torch path; the CPU-vs-GPU check compares the
CPU with itself).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
from gpu_checks import CheckRecord  # noqa: E402  (scripts/, the script's own folder)

RECORD = CheckRecord()
RESULTS = RECORD.results
check = RECORD.run
TOL = 2e-3  # relative: fla's fp32 kernels may use tf32 matmuls


def build(family: str):
    import tiny_fla_models as t

    return {"delta_net": t.build_tiny_deltanet, "gla": t.build_tiny_gla, "rwkv7": t.build_tiny_rwkv7}[family]()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float().cpu(), b.detach().float().cpu()
    return float((a - b).abs().max() / max(1.0, float(b.abs().max())))


def run_family(family: str, device: torch.device) -> None:
    from writesae_plugin.adapters import WriteEdit, hook_model
    from writesae_plugin.selfcheck import reference_read

    hf_cpu = build(family)
    hf = copy.deepcopy(hf_cpu).to(device)
    model = hook_model(hf)
    cpu_model = hook_model(hf_cpu)
    ids = torch.randint(3, 250, (2, 70), generator=torch.Generator().manual_seed(0)).to(device)

    def capture():
        with torch.no_grad():
            plain = hf(input_ids=ids).logits
            hooked = model(ids)
        plain_g, hooked_g = hf(input_ids=ids).logits, model(ids)  # autograd on: fla's chunk kernels
        return {"ok": torch.equal(plain, hooked) and torch.equal(plain_g, hooked_g),
                "max_abs_no_grad": float((plain - hooked).abs().max()),
                "max_abs_grad": float((plain_g - hooked_g).abs().max())}

    def reference():
        out = {}
        with torch.no_grad():
            _, cache = model.run_with_cache(ids)
        cpu = {k: v.cpu() for k, v in cache.items()}
        for layer in model.cfg.recurrent_layers:
            p = model.hook_prefix(layer)
            out[f"layer{layer}_read_rel"] = rel(reference_read(model, cpu, layer), cpu[p + "hook_read"])
        return {"ok": max(out.values()) <= TOL, **out}

    def edit():
        layer, pos = model.cfg.recurrent_layers[1], 30
        g = torch.Generator().manual_seed(1)
        u, w = torch.randn(model.cfg.d_k, generator=g), torch.randn(model.cfg.d_v, generator=g)
        e = WriteEdit(layer=layer, pos=pos, head=1, batch=0, key=u, value=w)
        p = model.hook_prefix(layer)
        names = [p + n for n in ("hook_read", "hook_query", "hook_write_key", "hook_write_value", "hook_log_decay",
                                 "hook_v", "hook_beta", "hook_kk", "hook_a") if p + n in model.hook_dict]
        with torch.no_grad():
            _, clean = model.run_with_cache(ids, names_filter=names)
            with model.edits([e]):
                _, edited = model.run_with_cache(ids, names_filter=names)
        cpu = {k: v.cpu() for k, v in clean.items()}
        ref = reference_read(model, cpu, layer, {(0, pos, 1): torch.outer(u, w)})
        r_e, r_c = edited[p + "hook_read"], clean[p + "hook_read"]
        before = torch.equal(r_e[0, :pos], r_c[0, :pos]) and torch.equal(r_e[1], r_c[1])
        err = rel(ref, r_e)
        return {"ok": err <= TOL and before, "edit_vs_reference_rel": err, "before_and_other_row_exact": before}

    def decode():
        e = WriteEdit(layer=model.cfg.recurrent_layers[-1], pos=57, head=0, op="delete")
        with torch.no_grad():
            full = model.run_with_edits(ids[:, :62], [e])
            with model.edits([e]):
                out = model(ids[:, :55], return_type="hf")
                steps = [out.logits]
                for t in range(55, 62):
                    out = model(ids[:, t:t + 1], return_type="hf", past_key_values=out.past_key_values)
                    steps.append(out.logits)
        err = rel(torch.cat(steps, 1), full)
        return {"ok": err <= TOL, "decode_vs_full_rel": err}

    def cpu_vs_gpu():
        with torch.no_grad():
            err = rel(model(ids), cpu_model(ids.cpu()))
        return {"ok": err <= TOL, "logits_rel": err}

    def timing():
        long = torch.randint(3, 250, (4, 1024 if device.type == "cuda" else 128), device=device)

        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

        def med(fn):
            fn()
            sync()
            ts = []
            for _ in range(5):
                t0 = time.perf_counter()
                fn()
                sync()
                ts.append(time.perf_counter() - t0)
            return sorted(ts)[2]

        with torch.no_grad():
            t_plain = med(lambda: hf(input_ids=long))
            t_hooked = med(lambda: model(long))
            edit = WriteEdit(layer=model.cfg.recurrent_layers[0], pos=long.shape[1] // 2, head=0, op="delete")
            t_edit = med(lambda: model.run_with_edits(long, [edit]))
        return {"plain_ms": 1e3 * t_plain, "hooked_ratio": t_hooked / t_plain, "one_edit_ratio": t_edit / t_plain}

    for name, fn in (("capture", capture), ("reference", reference), ("edit", edit), ("decode", decode),
                     ("cpu_vs_gpu", cpu_vs_gpu), ("timing", timing)):
        check(f"{family}.{name}", fn)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--families", default="rwkv7,gla,delta_net")
    ap.add_argument("--device", default="cuda", help="cuda (the check) or cpu (a dry run of the script)")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: this check runs fla's triton kernels on a GPU (--device cpu: a dry run)")
        return 2
    from writesae_plugin.adapters import route_cpu_to_torch

    route_cpu_to_torch()  # CPU tensors (the CPU-path comparison) run torch; the GPU keeps fla's kernels
    RESULTS["env"] = {"torch": torch.__version__,
                      "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu (dry run)"}
    try:
        import fla
        import triton

        RESULTS["env"].update(fla=fla.__version__, triton=triton.__version__)
    except Exception as e:  # recorded, and every check then fails with its own error
        RESULTS["env"]["import_error"] = repr(e)
    for family in args.families.split(","):
        run_family(family.strip(), device)
    RECORD.write_json(os.path.join(args.out, "gpu_check_fla.json"))
    return 1 if RECORD.failed() else 0


if __name__ == "__main__":
    sys.exit(main())
