"""The paper checkpoint converter on every layout the paper's reference code writes (issue 12, item 13).

Synthetic checkpoints are built the way github.com/JackYoung27/writesae ``core/train.py`` saves them
(``{"model_state_dict", "config", "val_mse", ...}``, factors ``[n, rank, d]``) and compared with a readable
re-statement of that code's encode/decode.
"""

from __future__ import annotations

import json

import pytest
import torch

import writesae_plugin  # noqa: F401
from writesae_plugin.sae.convert import load_paper_checkpoint

DK, DV, N = 6, 5, 24  # d_k != d_v so that orientation mistakes show


def rand_factors(n, r, d, g):
    x = torch.randn(n, r, d, generator=g)
    return x / x.norm(dim=-1, keepdim=True)


def paper_state(kind: str, rank: int = 1, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    sd = {"steps_since_active": torch.zeros(N, dtype=torch.long)}
    if kind in ("bilinear", "bilinear_tied", "bilinear_jumprelu", "bilinear_flat"):
        sd["b_enc"] = torch.randn(N, generator=g) * 0.1
        if kind != "bilinear_tied":
            sd["V_enc"], sd["W_enc"] = rand_factors(N, rank, DK, g) * 2, rand_factors(N, rank, DV, g) * 2
    if kind in ("rank1", "flat"):
        sd["encoder.weight"] = torch.randn(N, DK * DV, generator=g) * 0.3
        sd["encoder.bias"] = torch.randn(N, generator=g) * 0.1
    if kind in ("bilinear", "bilinear_tied", "bilinear_jumprelu"):
        sd["V_dec"], sd["W_dec"] = rand_factors(N, rank, DK, g), rand_factors(N, rank, DV, g)
    if kind == "rank1":
        sd["V"], sd["W"] = rand_factors(N, rank, DK, g), rand_factors(N, rank, DV, g)
    if kind in ("bilinear", "bilinear_tied", "bilinear_jumprelu", "rank1"):
        sd["bias"] = torch.randn(DK, DV, generator=g) * 0.1
    if kind in ("flat", "bilinear_flat"):
        sd["decoder.weight"] = torch.randn(DK * DV, N, generator=g)
        sd["decoder.bias"] = torch.randn(DK * DV, generator=g) * 0.1
    if kind == "bilinear_jumprelu":
        sd["log_threshold"] = torch.full((N,), 0.3).log()
    return sd


def paper_pre(sd: dict, X: torch.Tensor) -> torch.Tensor:
    """The reference code's pre-activations (no input centring)."""
    if "encoder.weight" in sd:
        return X.reshape(len(X), -1) @ sd["encoder.weight"].T + sd["encoder.bias"]
    V = sd.get("V_enc", sd.get("V_dec"))
    W = sd.get("W_enc", sd.get("W_dec"))
    return torch.einsum("irk,bkv,irv->bi", V, X, W) + sd["b_enc"]


def paper_topk(pre: torch.Tensor, k: int) -> torch.Tensor:
    vals, idx = pre.topk(k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, idx, vals.relu())


def paper_decode(sd: dict, c: torch.Tensor) -> torch.Tensor:
    if "decoder.weight" in sd:
        return (c @ sd["decoder.weight"].T + sd["decoder.bias"]).reshape(len(c), DK, DV)
    V, W = sd.get("V_dec", sd.get("V")), sd.get("W_dec", sd.get("W"))
    return torch.einsum("bi,irk,irv->bkv", c, V, W) + sd["bias"]


def save_training_checkpoint(path, sd, **config):
    cfg = {"sae_type": "bilinear", "layer": 9, "head": 4, "n_features": N, "d_k": DK, "d_v": DV, "d_in": DK * DV,
           "k": 4, "rank": 1, "use_batchtopk": False, "seed": 42, "batch_size": 8, "device": "cpu",
           "code_sha": "abc1234"}
    cfg.update(config)
    torch.save({"model_state_dict": sd, "config": cfg, "epoch": 3, "step": 120, "val_mse": 0.0123,
                "best_val_mse": 0.0121, "optimizer_state_dict": {"state": {}, "param_groups": [{"lr": 3e-4}]}}, path)


@pytest.fixture
def X():
    return torch.randn(10, DK, DV, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("kind,rank", [("bilinear", 1), ("bilinear", 3), ("bilinear_tied", 2), ("rank1", 2),
                                       ("flat", 1), ("bilinear_flat", 1), ("bilinear_jumprelu", 2)])
def test_training_checkpoint_layout_every_type(tmp_path, X, kind, rank):
    sd = paper_state(kind, rank)
    save_training_checkpoint(tmp_path / "best.pt", sd, sae_type=kind, rank=rank)
    sae = load_paper_checkpoint(tmp_path / "best.pt", hook_name="blocks.9.linear_attn.hook_state")
    assert (sae.cfg.d_k, sae.cfg.d_v, sae.cfg.d_sae, sae.cfg.k, sae.cfg.layer) == (DK, DV, N, 4, 9)
    pre = paper_pre(sd, X)
    if kind == "bilinear_jumprelu":
        codes = pre * (pre > 0.3)
    else:
        codes = paper_topk(pre, 4)
    assert torch.allclose(sae.encode(X), codes, atol=1e-5)
    assert torch.allclose(sae.decode(codes), paper_decode(sd, codes), atol=1e-5)
    assert sae.cfg.decoder_rank == (None if kind in ("flat", "bilinear_flat") else rank)


def test_bare_state_dict_with_rank_axis_and_sidecar_config(tmp_path, X):
    """``[n, 1, d]`` factors in a bare state dict (the old converter read d_k = 1 from them); the paper's
    training writes its config to ``config.json`` beside the checkpoint."""
    sd = paper_state("bilinear", 1)
    torch.save(sd, tmp_path / "ckpt.pt")
    sae = load_paper_checkpoint(tmp_path / "ckpt.pt", k=3)
    assert (sae.cfg.d_k, sae.cfg.d_v) == (DK, DV)
    assert torch.allclose(sae.encode(X), paper_topk(paper_pre(sd, X), 3), atol=1e-5)
    (tmp_path / "config.json").write_text(json.dumps({"sae_type": "bilinear", "k": 5, "d_k": DK, "d_v": DV}))
    assert load_paper_checkpoint(tmp_path / "ckpt.pt").cfg.k == 5
    with pytest.raises(ValueError, match="d_k"):
        load_paper_checkpoint(tmp_path / "ckpt.pt", d_k=DK + 1)


def test_safetensors_and_wrapper_prefixes(tmp_path, X):
    from safetensors.torch import save_file

    sd = paper_state("bilinear", 2)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "sae.safetensors"),
              metadata={"config": json.dumps({"sae_type": "bilinear", "k": 4})})
    sae = load_paper_checkpoint(tmp_path / "sae.safetensors")
    assert torch.allclose(sae.encode(X), paper_topk(paper_pre(sd, X), 4), atol=1e-5)
    torch.save({"state_dict": {"module." + k: v for k, v in sd.items()}}, tmp_path / "ddp.pt")
    assert torch.allclose(load_paper_checkpoint(tmp_path / "ddp.pt", k=4).encode(X), sae.encode(X))


def test_value_first_checkpoint(tmp_path, X):
    """A checkpoint of value-first matrices gives, on ``X``, the codes the paper's code gives on ``X^T``."""
    for kind in ("bilinear", "flat"):
        sd = paper_state(kind, 2)
        Xt = X.transpose(1, 2).contiguous()  # [N, DV, DK] in the checkpoint's frame
        # the checkpoint's own matrices are [DV, DK]: swap the roles of the factor shapes
        if kind == "bilinear":
            sd = {**sd, "V_enc": sd["W_enc"], "W_enc": sd["V_enc"], "V_dec": sd["W_dec"], "W_dec": sd["V_dec"],
                  "bias": sd["bias"].T.contiguous()}
        save_training_checkpoint(tmp_path / f"{kind}.pt", sd, sae_type=kind, d_k=DV, d_v=DK)
        sae = load_paper_checkpoint(tmp_path / f"{kind}.pt", value_first=True)
        assert (sae.cfg.d_k, sae.cfg.d_v) == (DK, DV)
        codes = paper_topk(paper_pre({**sd}, Xt) if kind == "bilinear" else
                           Xt.reshape(len(X), -1) @ sd["encoder.weight"].T + sd["encoder.bias"], 4)
        assert torch.allclose(sae.encode(X), codes, atol=1e-5)
        if kind == "bilinear":
            ref = torch.einsum("bi,irk,irv->bkv", codes, sd["V_dec"], sd["W_dec"]) + sd["bias"]
        else:
            ref = (codes @ sd["decoder.weight"].T + sd["decoder.bias"]).reshape(len(X), DV, DK)
        assert torch.allclose(sae.decode(codes), ref.transpose(1, 2), atol=1e-5)


def test_batchtopk_is_honoured_or_refused(tmp_path, X):
    sd = paper_state("bilinear", 1)
    save_training_checkpoint(tmp_path / "btk.pt", sd, use_batchtopk=True, batch_size=4)
    with pytest.raises(ValueError, match="BatchTopK"):  # never silently per-row TopK
        load_paper_checkpoint(tmp_path / "btk.pt")
    pre = paper_pre(sd, X)
    sae = load_paper_checkpoint(tmp_path / "btk.pt", batchtopk_threshold=0.2)
    assert sae.cfg.activation == "batchtopk"
    assert torch.allclose(sae.encode(X), pre * (pre > 0.2), atol=1e-6)
    # calibration: the mean, over batches of the config's batch size, of the smallest activation the paper's
    # batch-level selection (k * batch largest ReLU'd pre-activations) keeps
    mins = []
    for i in range(0, len(X), 4):
        p = pre[i:i + 4].relu().flatten()
        kept = p.topk(4 * len(pre[i:i + 4])).values
        mins.append(kept[kept > 0].min())
    thr = torch.stack(mins).mean()
    cal = load_paper_checkpoint(tmp_path / "btk.pt", calibration=X)
    assert torch.allclose(cal.threshold, thr.expand(N), atol=1e-6)
    assert torch.allclose(cal.encode(X), pre * (pre > thr), atol=1e-6)
    save_training_checkpoint(tmp_path / "plain.pt", sd)
    with pytest.raises(ValueError, match="not BatchTopK"):
        load_paper_checkpoint(tmp_path / "plain.pt", batchtopk_threshold=0.2)


def test_gated_and_unknown_layouts_refused(tmp_path):
    sd = paper_state("bilinear", 1)
    gated = {**{k: v for k, v in sd.items() if k != "b_enc"}, "b_gate": torch.zeros(N), "b_mag": torch.zeros(N),
             "r_mag": torch.zeros(N)}
    torch.save(gated, tmp_path / "gated.pt")
    with pytest.raises(ValueError, match="bilinear_gated"):
        load_paper_checkpoint(tmp_path / "gated.pt", k=4)
    torch.save({**sd, "mystery": torch.zeros(3)}, tmp_path / "extra.pt")
    with pytest.raises(ValueError, match="mystery"):
        load_paper_checkpoint(tmp_path / "extra.pt", k=4)
    torch.save(sd, tmp_path / "nok.pt")
    with pytest.raises(ValueError, match="k="):
        load_paper_checkpoint(tmp_path / "nok.pt")


def _side_effect(path):
    open(path, "w").write("code ran")
    return torch.zeros(1)


class _Payload:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (_side_effect, (self.path,))


def test_pickle_with_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "ran.txt"
    sd = paper_state("bilinear", 1)
    torch.save({"model_state_dict": sd, "config": {"k": 4}, "val_mse": 0.1, "hook": _Payload(str(marker))},
               tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="refused to unpickle.*weights_only.*allow_pickle"):
        load_paper_checkpoint(tmp_path / "evil.pt")
    assert not marker.exists()
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="not a readable torch checkpoint"):
        load_paper_checkpoint(tmp_path / "junk.pt")
