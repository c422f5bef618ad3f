"""The training loss computed on the trained tokens alone.

A causal LM's forward turns every position of every row into full-vocabulary logits (49,152 of them per token for
SmolLM2) and the loss then ignores all but the answer tokens. Here the decoder runs as usual (adapters active), and
the output head and the cross-entropy run only on the positions whose next token carries a label: on a labelled row
(a few answer tokens after a long prompt) that is a small share of the positions, on a chat row about half. The loss
is the same number the model's own loss gives (sum over trained tokens, divided by the Trainer's token count, else
the mean); `SelectedLoss` checks that on the first micro-batch and falls back to the plain forward where it differs.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("fewtune.train")

# Inputs the decoder takes as the plain forward does; anything else (e.g. pixel values) means "not this path".
DECODER_INPUTS = {"input_ids", "attention_mask", "position_ids", "past_key_values", "labels"}


def selected_loss(model, inputs: dict[str, Any], num_items_in_batch=None):
    """Cross-entropy of the trained tokens of `inputs` through `model` (a `PeftModel` whose adapters live inside the
    base model's layers), computing the output head on those tokens only. None where this path does not apply."""
    import torch
    import torch.nn.functional as F

    if set(inputs) - DECODER_INPUTS or inputs.get("labels") is None:
        return None
    base = model.get_base_model()
    config = getattr(base, "config", None)
    if any(getattr(config, k, None) not in (None, 1, 1.0) for k in ("final_logit_softcapping", "logit_scale",
                                                                    "logits_scaling")):
        return None  # models that rescale their logits after the head
    decoder, head = base.get_decoder(), base.get_output_embeddings()
    if decoder is None or not isinstance(head, torch.nn.Linear):
        return None
    labels = inputs["labels"]
    kwargs = {k: v for k, v in inputs.items() if k != "labels"}
    hidden = decoder(**kwargs, use_cache="past_key_values" in kwargs).last_hidden_state
    targets = labels[:, 1:]
    keep = targets != -100
    logits = head(hidden[:, :-1][keep]).float()
    total = F.cross_entropy(logits, targets[keep], reduction="sum")
    if num_items_in_batch is not None:
        return total / num_items_in_batch
    return total / keep.sum().clamp(min=1)


class SelectedLoss:
    """`selected_loss` for one Trainer, checked once against the model's own loss on the first micro-batch (plain
    inputs, no gradients, no dropout): equal within `tolerance` (relative), it is used from then on; otherwise, or
    where it does not apply, every step runs the plain forward."""

    def __init__(self, enabled: bool, tolerance: float):
        self.enabled, self.tolerance, self.checked = enabled, tolerance, False

    def check(self, model, inputs: dict[str, Any], num_items_in_batch, plain_loss) -> bool:
        """Compare once with `plain_loss(inputs)`, the model's own loss; True when this path is on."""
        import torch

        if self.checked or not self.enabled:
            return self.enabled
        self.checked = True
        was_training = model.training
        model.eval()  # no dropout: both losses of the same weights and inputs
        try:
            with torch.no_grad():
                mine = selected_loss(model, inputs, num_items_in_batch)
                theirs = plain_loss(inputs) if mine is not None else None
        except (TypeError, AttributeError, NotImplementedError, ValueError, RuntimeError) as exc:
            log.info("trained-token loss is off for this model (%s): plain forward", exc)
            mine = None
        finally:
            model.train(was_training)
        if mine is None:
            self.enabled = False
            return False
        gap = abs(float(mine) - float(theirs)) / max(abs(float(theirs)), 1e-6)
        if gap > self.tolerance:
            log.warning("trained-token loss differs from the model's own by %.2g (relative, above %.2g): plain "
                        "forward for this run", gap, self.tolerance)
            self.enabled = False
            return False
        log.info("trained-token loss: output head on trained tokens only (checked: relative gap %.1g)", gap)
        return True

    def __call__(self, model, inputs: dict[str, Any], num_items_in_batch):
        """The loss of `inputs` (plain, or with a shared prefix's cache), or None for "use the plain forward"."""
        if not (self.checked and self.enabled):
            return None
        return selected_loss(model, inputs, num_items_in_batch)
