"""Patching, attribution and circuits over cache writes and WriteSAE atoms (issue 7)."""

from .attribution_patching import attribute_atoms, attribute_writes, compare_with_patching, write_gradients
from .editing import edit_atoms, mean_ci
from .feature_circuits import Circuit, acdc_prune, feature_circuit
from .path_patching import Reads, path_patch, read_deltas
from .patching import (PatchResult, kl_from, logit_diff, normalized_score, patch_atoms, patch_writes,
                       run_edit_rows, site_codes, write_patch_index)

__all__ = ["edit_atoms", "mean_ci", "Circuit", "acdc_prune", "feature_circuit", "Reads", "path_patch", "read_deltas", "attribute_atoms", "attribute_writes", "compare_with_patching", "write_gradients", "PatchResult", "kl_from", "logit_diff", "normalized_score", "patch_atoms", "patch_writes",
           "run_edit_rows", "site_codes", "write_patch_index"]
