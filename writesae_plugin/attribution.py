"""Gradient attribution of a scalar metric to WriteSAE features: ``act * d metric / d act`` at
``{hook}.hook_sae_acts_post``, through TransformerLens backward hooks or an nnsight trace."""

from __future__ import annotations

from typing import Callable

from torch import Tensor


def feature_attribution(model, tokens: Tensor, sae, metric: Callable[[Tensor], Tensor],
                        use_error_term: bool = True) -> tuple[Tensor, Tensor]:
    """``(acts, act * grad)`` of ``sae``'s features for ``metric(logits)`` (a scalar), TL backward hooks.

    The SAE is spliced with its error term, so the forward is the clean model's and the attribution is
    the first-order effect of removing each feature activation.
    """
    name = sae.cfg.metadata.hook_name + ".hook_sae_acts_post"
    saved: dict[str, Tensor] = {}

    def keep_act(x, hook):
        saved["act"] = x.detach()
        return x

    def keep_grad(g, hook):
        saved["grad"] = g.detach()

    with model.saes([sae], use_error_term=use_error_term):
        with model.hooks(fwd_hooks=[(name, keep_act)], bwd_hooks=[(name, keep_grad)]):
            logits = model(tokens)
            m = metric(logits)
            if m.dim() != 0:
                raise ValueError(f"metric must return a scalar, got shape {list(m.shape)}")
            m.backward()
    return saved["act"], saved["act"] * saved["grad"]


def feature_attribution_nnsight(model, tokens: Tensor, sae, metric: Callable[[Tensor], Tensor],
                                use_error_term: bool = True) -> tuple[Tensor, Tensor]:
    """The same attribution through an nnsight trace (``.grad`` inside ``with m.backward():``)."""
    from nnsight import NNsight

    with model.saes([sae], use_error_term=use_error_term):
        nn_model = NNsight(model)  # wrap after splicing: the envoy tree must see the SAE modules
        envoy = nn_model
        for part in sae.cfg.metadata.hook_name.split("."):
            envoy = envoy[int(part)] if part.isdigit() else getattr(envoy, part)
        with nn_model.trace(tokens):
            acts = envoy.hook_sae_acts_post.output
            acts_saved = acts.save()
            m = metric(nn_model.output)
            with m.backward():
                grad = acts.grad.save()
    return acts_saved.detach(), acts_saved.detach() * grad
