"""Patching, attribution and circuits over cache writes and WriteSAE atoms (issue 7)."""

from .attribution_patching import attribute_atoms, attribute_writes, compare_with_patching, write_gradients
from .patching import (PatchResult, kl_from, logit_diff, normalized_score, patch_atoms, patch_writes,
                       run_edit_rows, site_codes, write_patch_index)

__all__ = ["attribute_atoms", "attribute_writes", "compare_with_patching", "write_gradients", "PatchResult", "kl_from", "logit_diff", "normalized_score", "patch_atoms", "patch_writes",
           "run_edit_rows", "site_codes", "write_patch_index"]
