"""Neuronpedia's upload format for a WriteSAE dashboard (``writesae dashboard --neuronpedia DIR``).

The layout and rows follow Neuronpedia's public exporter (``utils/neuronpedia-utils``,
``convert-saedashboard-to-neuronpedia-export.py`` and its ``db_models``)::

    DIR/{model_id}/{source_id}/release.jsonl.gz     one SourceRelease row
                               model.jsonl.gz       one Model row
                               sourceset.jsonl.gz   one SourceSet row
                               source.jsonl.gz      one Source row
                               features/batch-0.jsonl.gz     one Feature row per atom
                               activations/batch-0.jsonl.gz  Activation rows: top and quantile contexts

``source_id`` is ``"{layer}-{source_set}"`` as Neuronpedia names sources. Feature rows carry every field of the
exporter's ``Feature`` (``pos_str`` / ``pos_values`` and ``neg_str`` / ``neg_values``: the atom's value side
through the linearised norms, the direct-path logits per unit activation as its head reads it;
``frac_nonzero`` its firing density; ``freq_hist_data_*`` its activation histogram: bar heights = firings,
values = bin centres). A matrix atom has no residual-stream vector, so ``hasVector`` is false. Activation rows
carry the exporter's required fields (``id, tokens, index, layer, modelId, maxValue, maxValueTokenIndex,
minValue, values, creatorId``) plus the bin fields; token positions outside the context are dropped.
"""

from __future__ import annotations

import gzip
import json
import math
from datetime import datetime, timezone
from pathlib import Path

from ..checkpoints import atomic_write_bytes

FEATURE_REQUIRED = ("modelId", "layer", "index")
ACTIVATION_REQUIRED = ("id", "tokens", "index", "layer", "modelId", "maxValue", "maxValueTokenIndex", "minValue",
                       "values", "creatorId")


def _jsonl_gz(path: Path, rows: list[dict]) -> None:
    text = "".join(json.dumps(r, allow_nan=False) + "\n" for r in rows)
    atomic_write_bytes(path, gzip.compress(text.encode(), compresslevel=5))


def _activation_row(rec: dict, row: dict, ident: str, common: dict, bin_: tuple) -> dict | None:
    keep = [j for j, t in enumerate(row["token_ids"]) if t != -1]
    if not keep:
        return None
    toks = [row["tokens"][j] for j in keep]
    vals = [float(row["acts"][j]) for j in keep]
    mx = max(vals)
    return {"id": ident, "tokens": toks, "index": str(rec["atom"]), **common, "maxValue": mx,
            "maxValueTokenIndex": vals.index(mx), "minValue": min(vals), "values": vals, "dataSource": None,
            "dataIndex": None, "dfaValues": [], "dfaTargetIndex": None, "dfaMaxValue": None, "lossValues": [],
            "logitContributions": None, "binMin": bin_[0], "binMax": bin_[1], "binContains": bin_[2],
            "qualifyingTokenIndex": keep.index(row["center"]) if row["center"] in keep else None}


def write_neuronpedia(records: list[dict], out_dir: str | Path, *, model_id: str, hook_name: str,
                      source_set: str | None = None, creator: str = "writesae-plugin", dataset: str = "",
                      n_prompts: int = 0, n_tokens_in_prompt: int = 0, model_layers: int = 0,
                      release_id: str = "writesae", url: str = "") -> Path:
    """Write ``records`` (the atoms' page data, :func:`~writesae_plugin.dashboard.site.atom_record`) in
    Neuronpedia's upload layout under ``out_dir`` (module docstring); returns the source directory.
    Raises ``ValueError`` for no records or a model id with a path separator."""
    if not records:
        raise ValueError("no atoms to export: none of the atoms with pages fired on the data (Neuronpedia needs "
                         "activations; give more --tokens, other --atoms or --max-pages)")
    if "/" in model_id or not model_id:
        raise ValueError(f"model id {model_id!r} must be a non-empty name without '/' (Neuronpedia's model id)")
    sae = records[0]["sae"]
    source_set = source_set or f"writesae-{sae['site']}-h{sae['head']}-{sae['d_sae']}"
    source_id = f"{sae['layer']}-{source_set}"
    root = Path(out_dir) / model_id / source_id
    (root / "features").mkdir(parents=True, exist_ok=True)
    (root / "activations").mkdir(parents=True, exist_ok=True)
    now = datetime.now(timezone.utc).isoformat()
    common = {"layer": source_id, "modelId": model_id, "creatorId": creator, "createdAt": now}
    _jsonl_gz(root / "release.jsonl.gz", [{"name": release_id, "description": f"WriteSAE {source_set}",
                                           "descriptionShort": f"WriteSAE {source_set}", "urls": [url] if url else [],
                                           "creatorNameShort": creator, "creatorName": creator, "creatorId": creator,
                                           "defaultSourceSetName": source_set, "createdAt": now}])
    _jsonl_gz(root / "model.jsonl.gz", [{"id": model_id, "instruct": False, "displayNameShort": model_id,
                                         "displayName": model_id, "creatorId": creator,
                                         "defaultSourceSetName": source_set, "defaultGraphSourceSetName": source_set,
                                         "layers": model_layers, "createdAt": now, "updatedAt": now}])
    _jsonl_gz(root / "sourceset.jsonl.gz", [{"modelId": model_id, "name": source_set, "creatorId": creator,
                                             "createdAt": now, "creatorName": creator, "releaseName": release_id,
                                             "description": f"WriteSAE L{sae['layer']}.H{sae['head']} {sae['site']} "
                                                            f"({sae['d_sae']} rank-1 matrix atoms)",
                                             "visibility": "PUBLIC"}])
    _jsonl_gz(root / "source.jsonl.gz", [{"modelId": model_id, "setName": source_set, "visibility": "PUBLIC",
                                          "dataset": dataset, "id": source_id, "num_prompts": n_prompts,
                                          "num_tokens_in_prompt": n_tokens_in_prompt, "hfRepoId": None,
                                          "hfFolderId": None, "creatorId": creator}])
    features, acts = [], []
    for rec in records:
        vs = rec["value_side"]["norms"]
        h = rec["histogram"]
        centres = [math.sqrt(max(a, 1e-12) * b) for a, b in zip(h["edges"][:-1], h["edges"][1:])]
        features.append({"modelId": model_id, "layer": source_id, "index": str(rec["atom"]), "creatorId": creator,
                         "createdAt": now, "maxActApprox": rec["max_act"] or 0.0, "hasVector": False, "vector": [],
                         "vectorLabel": None, "vectorDefaultSteerStrength": None, "hookName": hook_name,
                         "topkCosSimIndices": [], "topkCosSimValues": [],
                         "neuron_alignment_indices": [], "neuron_alignment_values": [], "neuron_alignment_l1": [],
                         "correlated_neurons_indices": [], "correlated_neurons_pearson": [],
                         "correlated_neurons_l1": [], "correlated_features_indices": [],
                         "correlated_features_pearson": [], "correlated_features_l1": [],
                         "neg_str": [t for t, _ in vs["bottom"]], "neg_values": [v for _, v in vs["bottom"]],
                         "pos_str": [t for t, _ in vs["top"]], "pos_values": [v for _, v in vs["top"]],
                         "frac_nonzero": rec["density"], "freq_hist_data_bar_heights": h["counts"],
                         "freq_hist_data_bar_values": centres, "logits_hist_data_bar_heights": [],
                         "logits_hist_data_bar_values": [], "decoder_weights_dist": []})
        for j, row in enumerate(rec["top_contexts"]):
            r = _activation_row(rec, row, f"{source_id}-{rec['atom']}-top{j}", common,
                                (row["act"], rec["max_act"], row["act"]))
            if r:
                acts.append(r)
        for j, row in enumerate(rec["quantile_samples"]):
            r = _activation_row(rec, row, f"{source_id}-{rec['atom']}-q{j}", common,
                                (row["act"], row["act"], row["quantile"]))
            if r:
                acts.append(r)
    _jsonl_gz(root / "features" / "batch-0.jsonl.gz", features)
    _jsonl_gz(root / "activations" / "batch-0.jsonl.gz", acts)
    return root


__all__ = ["write_neuronpedia", "FEATURE_REQUIRED", "ACTIVATION_REQUIRED"]
