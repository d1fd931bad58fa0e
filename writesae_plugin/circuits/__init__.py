"""Patching, attribution and circuits over cache writes and WriteSAE atoms (issue 7)."""

from .patching import (PatchResult, kl_from, logit_diff, normalized_score, patch_atoms, patch_writes,
                       run_edit_rows, site_codes, write_patch_index)

__all__ = ["PatchResult", "kl_from", "logit_diff", "normalized_score", "patch_atoms", "patch_writes",
           "run_edit_rows", "site_codes", "write_patch_index"]
