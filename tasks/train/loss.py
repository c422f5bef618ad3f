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

from tasks.common.nll import fast_parts

log = logging.getLogger("fewtune.train")

# Inputs the decoder takes as the plain forward does; anything else (e.g. pixel values) means "not this path".
DECODER_INPUTS = {"input_ids", "attention_mask", "position_ids", "past_key_values", "labels"}


def selected_loss(model, inputs: dict[str, Any], num_items_in_batch=None):
    """Cross-entropy of the trained tokens of `inputs` through `model` (a `PeftModel` whose adapters live inside the
    base model's layers), computing the output head on those tokens only. None where this path does not apply."""
    import torch
    import torch.nn.functional as F

    parts = fast_parts(model)
    if set(inputs) - DECODER_INPUTS or inputs.get("labels") is None or parts is None:
        return None
    decoder, head = parts
    if not isinstance(head, torch.nn.Linear):
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


def model_loss_of_one_row(model, inputs: dict[str, Any]):
    """The model's own forward on the first row of `inputs` (padding dropped), its logits taken at the positions
    that predict trained tokens (`logits_to_keep` with those positions: the model's own head and any rescaling it
    applies), and the mean cross-entropy of those tokens. Returns (that loss, the same row as inputs)."""
    import torch
    import torch.nn.functional as F

    keep = inputs["attention_mask"][0].bool() if inputs.get("attention_mask") is not None else None
    row = {k: (v[0][keep] if keep is not None else v[0]).unsqueeze(0) for k, v in inputs.items()
           if k in ("input_ids", "attention_mask", "labels")}
    targets = row["labels"][0, 1:]
    positions = torch.nonzero(targets != -100).flatten()
    logits = model(input_ids=row["input_ids"], attention_mask=row.get("attention_mask"),
                   logits_to_keep=positions).logits[0]
    return F.cross_entropy(logits.float(), targets[positions]), row


class SelectedLoss:
    """`selected_loss` for one Trainer, checked once against the model's own forward on the first row of the first
    micro-batch (no gradients, no dropout): equal within `tolerance` (relative), it is used from then on; otherwise,
    or where it does not apply, every step runs the plain forward. The check computes logits for that row's trained
    positions only, so it never needs more memory than the step it guards."""

    def __init__(self, enabled: bool, tolerance: float):
        self.enabled, self.tolerance, self.checked = enabled, tolerance, False

    def check(self, model, inputs: dict[str, Any]) -> bool:
        """Compare once with the model's own forward; True when this path is on."""
        import torch

        from tasks.common.memory import is_out_of_memory

        if self.checked or not self.enabled:
            return self.enabled
        self.checked = True
        was_training = model.training
        model.eval()  # no dropout: both losses of the same weights and inputs
        try:
            with torch.no_grad():
                theirs, row = model_loss_of_one_row(model, inputs)
                mine = selected_loss(model, row)
        except Exception as exc:  # noqa: BLE001 - any failure of the shortcut means the plain forward
            if is_out_of_memory(exc):
                raise
            log.info("trained-token loss is off for this model (%s: %s): plain forward", type(exc).__name__, exc)
            mine = None
        finally:
            model.train(was_training)
        if mine is None:
            self.enabled = False
            return False
        gap = abs(float(mine) - float(theirs)) / max(abs(float(theirs)), 1e-6)
        if not gap <= self.tolerance:  # (a NaN gap fails too)
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


def replay_kl_loss(model, inputs: dict[str, Any], num_items_in_batch=None):
    """Learning without forgetting on replay rows (`train.replay_loss: kl`): KL(base || tuned) of the next-token
    distributions at the rows' trained positions, the frozen base model's (the PEFT model with its adapter switched
    off, no gradient) as the target over the full vocabulary, instead of the cross-entropy of its greedy tokens.
    Summed and divided as the cross-entropy is (the batch's trained-token count), so the two terms add up."""
    import torch
    import torch.nn.functional as F

    keep = inputs["labels"][:, 1:] != -100
    kwargs = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask")}

    def log_probs(m):
        parts = fast_parts(m)
        if parts is None:  # (a distributed wrapper too: its forward keeps the gradients in step)
            return F.log_softmax(m(**kwargs).logits[:, :-1][keep].float(), dim=-1)
        return F.log_softmax(parts[1](parts[0](**kwargs).last_hidden_state[:, :-1][keep]).float(), dim=-1)

    peft_model = getattr(model, "module", model)  # the PEFT model inside a distributed wrapper
    with torch.no_grad(), peft_model.disable_adapter():
        base = log_probs(peft_model)
    total = F.kl_div(log_probs(model), base, log_target=True, reduction="sum")
    return total / (num_items_in_batch if num_items_in_batch is not None else keep.sum().clamp(min=1))


class ReplayMarkingCollator:
    """Wraps a training data collator: adds `replay` (bool per row) for the rows that are replay rows, so the loss can
    train them toward the base model's distributions (`replay_kl_loss`)."""

    def __init__(self, inner, replay_rows: list[list[int]]):
        self.inner, self.replay = inner, {tuple(ids) for ids in replay_rows}

    def __call__(self, features: list[dict[str, Any]]) -> Any:
        import torch

        batch = self.inner(features)
        batch["replay"] = torch.tensor([tuple(f["input_ids"]) in self.replay for f in features])
        return batch
