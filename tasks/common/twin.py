"""A tuned model and its base model held as one, for passes that need both on the same rows (the KL forgetting
signals, both models' perplexities in the evaluate stage).

The adapter is merged into the tuned model's weights (plain layers: no adapter overhead), and the base model's own
copies of the decoder layers the adapter changes are kept beside them. The layers below the first adapted one compute
the same for both models, so `Twin.hidden` runs them once per batch and then each model's upper layers on their
output; `Twin.base()` makes the model compute as the base model for whole passes. A check on one row
(`Twin.checked`) compares the shortcut with two whole passes before it is used. Adapters that cannot be merged or
change layer 0 (prompt learning, adapters on every layer) give a twin of whole passes, the base model computed by
switching the adapter off (`disable_adapter`).
"""

from __future__ import annotations

import contextlib
import copy
import logging
from dataclasses import dataclass, field
from typing import Any

from tasks.common.label_passes import cache_kwarg
from tasks.common.nll import fast_parts, prefix_cache_kwargs

log = logging.getLogger("fewtune.evaluate")


def first_adapted_layer(peft_model) -> int:
    """Index of the lowest decoder layer an adapter changes; every layer below computes the same for the base and
    the tuned model. 0 when unknown (no `layers` list, or adapter modules outside it)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    path = fast_parts(peft_model)
    layers = getattr(path[0], "layers", None) if path else None
    if layers is None:
        return 0
    tuners = sum(isinstance(m, BaseTunerLayer) for m in peft_model.modules())
    inside = [sum(isinstance(m, BaseTunerLayer) for m in layer.modules()) for layer in layers]
    if not tuners or sum(inside) != tuners:
        return 0
    return next(i for i, n in enumerate(inside) if n)


def adapted_from_layer(adapter_path: str) -> int:
    """The lowest decoder layer a saved adapter changes, read from its config (0: every layer, or not known)."""
    from peft import PeftConfig

    try:
        config = PeftConfig.from_pretrained(adapter_path)
    except (OSError, ValueError, TypeError):
        return 0
    layers = getattr(config, "layers_to_transform", None)
    if getattr(config, "is_prompt_learning", False) or getattr(config, "modules_to_save", None) or layers is None:
        return 0
    return min(layers) if isinstance(layers, (list, tuple)) else int(layers)


def _plain_copy(layer):
    """A copy of a decoder layer with every adapter module replaced by the module it wraps (the base model's layer)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layer = copy.deepcopy(layer)
    for name, module in list(layer.named_modules()):
        if isinstance(module, BaseTunerLayer):
            parent_name, _, child = name.rpartition(".")
            setattr(layer.get_submodule(parent_name) if parent_name else layer, child, module.get_base_layer())
    return layer


def _parts(model) -> tuple[Any, Any]:
    """(decoder, output head) of a model that splits into them (`fast_parts`)."""
    parts = fast_parts(model)
    if parts is None:
        raise ValueError(f"{type(model).__name__} does not split into a decoder and an output head")
    return parts


@dataclass
class Twin:
    """`model` computes as the tuned model; inside `base()` as the base model."""

    model: Any
    shared: int  # decoder layers below this index are the same in both models (0: whole passes)
    base_upper: list | None = None  # the base model's layers from `shared` up (merged twin)
    peft: Any = None  # the unmerged PEFT model (whole passes, the base with its adapter switched off)
    verdicts: dict[tuple, Twin] = field(default_factory=dict, repr=False, compare=False)  # `checked`'s outcomes

    @property
    def decoder(self):
        return _parts(self.model)[0]

    @contextlib.contextmanager
    def base(self):
        """Inside: the model computes as the base model."""
        if self.base_upper is None:
            with self.peft.disable_adapter():
                yield
            return
        layers = self.decoder.layers
        start = len(layers) - len(self.base_upper)
        tuned = [layers[i] for i in range(start, len(layers))]
        for i, layer in enumerate(self.base_upper):
            layers[start + i] = layer
        try:
            yield
        finally:
            for i, layer in enumerate(tuned):
                layers[start + i] = layer

    def merged(self):
        """The tuned model for generation: the adapter merged where the method allows it."""
        if self.peft is None:
            return self.model
        if self.peft.peft_config["default"].is_prompt_learning:
            return self.peft
        return self.peft.merge_and_unload()

    def hidden(self, ids, mask, prefix: dict[str, Any] | None = None):
        """(tuned, base) last hidden states, after the final norm, of a right-padded batch. With `prefix` (from
        `prefix_caches`), `ids` continue its tokens. The layers below `shared` run once."""
        decoder = self.decoder
        if not self.shared:
            tuned = decoder(input_ids=ids, **_with_prefix(decoder, prefix, "tuned", mask)).last_hidden_state
            with self.base():
                base = decoder(input_ids=ids, **_with_prefix(decoder, prefix, "base", mask)).last_hidden_state
            return tuned, base
        layers, seen = decoder.layers, dict[str, Any]()
        hook = layers[self.shared].register_forward_pre_hook(
            lambda _m, args, kwargs: seen.update(args=args, kwargs=dict(kwargs)), with_kwargs=True)
        tuned_kwargs = _with_prefix(decoder, prefix, "tuned", mask)
        try:
            tuned = decoder(input_ids=ids, **tuned_kwargs).last_hidden_state
        finally:
            hook.remove()
        args, kwargs = list(seen["args"]), seen["kwargs"]
        if prefix is not None:  # the base model's keys and values of the prefix for the layers it runs
            tuned_cache, base_cache = tuned_kwargs[cache_kwarg(decoder)], _with_prefix(decoder, prefix, "base", mask)[
                cache_kwarg(decoder)]
            kwargs = {k: base_cache if v is tuned_cache else v for k, v in kwargs.items()}
        hidden = args.pop(0) if args else kwargs.pop("hidden_states")
        for layer in self.base_upper or []:
            out = layer(hidden, *args, **kwargs)
            hidden = out[0] if isinstance(out, tuple) else out
        return tuned, decoder.norm(hidden)

    def checked(self, ids, mask, prefix: dict[str, Any] | None = None) -> Twin:
        """This twin when its shortcut agrees with two whole passes on the first row of a batch, else whole passes.
        Checked once per twin and kind of prefix (none, or the cache layer types a prefix was built with): the
        shortcut's agreement is a property of the model, the adapter and the prefix path, not of the rows."""
        if not self.shared:
            return self
        kind = (prefix is not None, *sorted({type(layer).__name__ for layer in getattr(
            (prefix or {}).get("tuned"), "layers", [])}))
        if kind not in self.verdicts:
            self.verdicts[kind] = self._check(ids, mask, prefix)
        return self.verdicts[kind]

    def _check(self, ids, mask, prefix: dict[str, Any] | None) -> Twin:
        whole = Twin(self.model, 0, self.base_upper, self.peft)
        head = _parts(self.model)[1]
        try:
            exact = [head(h).float() for h in whole.hidden(ids[:1], mask[:1], prefix)]
            gap = max(float((a - head(b).float()).abs().max()) for a, b in zip(exact, self.hidden(ids[:1], mask[:1], prefix)))
            scale = float(exact[0].abs().max())
        except (TypeError, KeyError, IndexError, AttributeError, ValueError) as exc:
            log.info("paired pass: layer shortcut unavailable (%s)", exc)
            return whole
        if gap > 1e-2 * (1 + scale):
            log.warning("paired pass: layers below the adapter run for each model (the shortcut differs by %.2g on "
                        "this model)", gap)
            return whole
        return self


def twin_of(peft_model) -> Twin:
    """The tuned model beside its base model: the adapter merged and the base model's upper layers copied when the
    adapter leaves the lowest layers alone and the model splits into decoder and head; else whole passes."""
    shared = first_adapted_layer(peft_model)
    if not shared or fast_parts(peft_model) is None or peft_model.peft_config["default"].is_prompt_learning:
        return Twin(peft_model, 0, None, peft_model)
    layers = _parts(peft_model)[0].layers
    try:
        upper = [_plain_copy(layer) for layer in layers[shared:]]
    except (TypeError, RuntimeError, AttributeError, ValueError, NotImplementedError) as exc:  # quantized weights
        log.info("paired pass: base layers not copied (%s); whole passes", exc)
        return Twin(peft_model, 0, None, peft_model)
    return Twin(peft_model.merge_and_unload(), shared, upper, None)


def prefix_caches(twin: Twin, prompt: list[int], device) -> dict[str, Any]:
    """Keys and values of leading tokens every row shares (a system prompt), for the tuned and the base model."""
    import torch
    from transformers import DynamicCache

    decoder = twin.decoder
    ids = torch.tensor([prompt], dtype=torch.long, device=device)
    caches = {}
    for which in ("tuned", "base"):
        kwargs = {cache_kwarg(decoder): DynamicCache()}
        with twin.base() if which == "base" else contextlib.nullcontext():
            decoder(input_ids=ids, use_cache=True, **kwargs)
        caches[which] = next(iter(kwargs.values()))
    return {"length": len(prompt), **caches}


def _with_prefix(decoder, prefix: dict[str, Any] | None, which: str, mask) -> dict[str, Any]:
    """The decoder's keyword arguments for rows that continue `prefix`: a per-row copy of its cache, the full mask."""
    if prefix is None:
        return prefix_cache_kwargs(None, 0, mask)
    return prefix_cache_kwargs(prefix[which], prefix["length"], mask, cache_kwarg(decoder))


def paired_nlls(twin: Twin, sequences: list[list[int]], *, pad_id: int, batch_size: int, logits_chunk: int = 512,
                desc: str = "scoring") -> tuple[list[list[float]], list[list[float]]] | None:
    """(tuned, base) NLL of tokens 1..n-1 of every sequence, as `sequence_nlls` gives them for each model, from one
    pass per batch whose lower layers both models share (the scoring engine's plan: shared prefixes once, length-sorted
    batches). None when the twin has no shared layers or the fast path fails its self-check: score each model on its
    own then."""
    import torch
    from tqdm.auto import tqdm

    from tasks.common.nll import batch_tensors, fast_path_agrees, plan_batches, prefix_state, rows_of

    parts = fast_parts(twin.model)
    if not twin.shared or parts is None or not any(len(s) >= 2 for s in sequences):
        return None
    decoder, head = parts
    device = next(twin.model.parameters()).device
    out: dict[str, list[list[float]]] = {"tuned": [[] for _ in sequences], "base": [[] for _ in sequences]}
    plan = plan_batches(sequences, batch_size=batch_size)
    twin.model.eval()
    with torch.inference_mode():
        if not fast_path_agrees(twin.model, parts, sequences, pad_id, device, logits_chunk):
            return None
        checked = None
        with tqdm(total=sum(len(b) for g in plan for b in g.batches), desc=desc, unit="row", leave=False) as bar:
            for group in plan:
                states, caches = {}, None
                if group.prefix:
                    for which in ("tuned", "base"):
                        with twin.base() if which == "base" else contextlib.nullcontext():
                            states[which] = prefix_state(decoder, head, group.prefix, device, logits_chunk)
                    caches = {"length": len(group.prefix), **{w: st["cache"] for w, st in states.items()}}
                for batch in group.batches:
                    seqs = [sequences[i] for i in batch]
                    ids, targets, mask = batch_tensors(seqs, len(group.prefix), pad_id, device)
                    if checked is None:
                        checked = twin.checked(ids, mask, caches)
                        if not checked.shared:
                            return None
                    hidden = dict(zip(("tuned", "base"), checked.hidden(ids, mask, caches)))
                    for which, h in hidden.items():
                        rows = rows_of(head, h, targets, mask, seqs, states.get(which), logits_chunk)
                        for i, row in zip(batch, rows):
                            out[which][i] = row
                    bar.update(len(batch))
    return out["tuned"], out["base"]
