"""Unknown keyword arguments are refused, never swallowed (issue 12 item 3): the HF forward takes **kwargs and
drops what it does not know, so ``use_error_term`` given to ``run_with_hooks_with_saes`` used to splice the SAE
without its error term, silently."""

from __future__ import annotations

import pytest
import torch

from tiny_mamba_models import build_tiny_mamba
from writesae_plugin.adapters import hook_model


@pytest.mark.parametrize("build", ["gdn", "mamba2"])
def test_unknown_keywords_raise_on_every_entry_point(qwen, build):
    model = hook_model(qwen if build == "gdn" else build_tiny_mamba("mamba2"))
    t = torch.randint(0, 200, (1, 6))
    for call in (lambda: model(t, use_error_term=True),
                 lambda: model.run_with_cache(t, use_error_term=True),
                 lambda: model.run_with_hooks(t, fwd_hooks=[], use_error_term=True),
                 lambda: model.run_with_saes(t, saes=[], bogus=True),
                 lambda: model.run_with_hooks_with_saes(t, saes=[], use_error_term=True, fwd_hooks=[]),
                 lambda: model.run_with_edits(t, [], bogus=1)):
        with pytest.raises(TypeError, match="unexpected keyword argument"):
            call()
    # keywords the HF forward does take still pass through
    with torch.no_grad():
        a = model(t, output_hidden_states=False)
    assert a.shape[:2] == (1, 6)
