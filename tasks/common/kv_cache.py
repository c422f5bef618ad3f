"""A key/value cache for greedy decoding that writes each step's keys and values in place.

transformers' `DynamicCache` grows by `torch.cat` on every decoding step: each step copies every layer's whole cache
(a batch of 50 prompts of ~100 tokens: 2 MB per layer and tensor, 60 copies per step for a 30-layer model). On a CPU
those copies were 17% of the demo's generation time. `GrowingLayer` keeps buffers with room for the whole answer
(the prompt's length plus `max_new_tokens`, known before the first step) and hands attention a view of the filled
part; the numbers are the same, only the copies go.
"""

from __future__ import annotations

from typing import Any


def _layer_class():
    from transformers.cache_utils import DynamicLayer

    class GrowingLayer(DynamicLayer):
        """A `DynamicLayer` whose keys and values live in buffers of `capacity` positions (doubled when full)."""

        def __init__(self, capacity: int = 0):
            super().__init__()
            self.capacity = capacity
            self.length = 0
            self.key_buffer: Any = None
            self.value_buffer: Any = None

        def _views(self) -> None:
            self.keys = self.key_buffer[:, :, : self.length]
            self.values = self.value_buffer[:, :, : self.length]

        def update(self, key_states, value_states, *args, **kwargs):
            n, m = self.length, key_states.shape[-2]
            if not self.is_initialized:
                self.device, self.is_initialized = key_states.device, True
            if self.key_buffer is None or n + m > self.key_buffer.shape[2]:
                room = max(self.capacity, n + m, 2 * (self.key_buffer.shape[2] if self.key_buffer is not None else 0))
                buffers = []
                for old, new in ((self.key_buffer, key_states), (self.value_buffer, value_states)):
                    buffer = new.new_empty((new.shape[0], new.shape[1], room, new.shape[3]))
                    if n:
                        buffer[:, :, :n] = old[:, :, :n]
                    buffers.append(buffer)
                self.key_buffer, self.value_buffer = buffers
            self.key_buffer[:, :, n : n + m] = key_states
            self.value_buffer[:, :, n : n + m] = value_states
            self.length = n + m
            self._views()
            return self.keys, self.values

        def get_seq_length(self) -> int:
            return self.length

        def batch_select_indices(self, indices) -> None:
            if self.key_buffer is not None:  # the rows kept (the buffers' room with them)
                self.key_buffer, self.value_buffer = self.key_buffer[indices], self.value_buffer[indices]
                self._views()

        def reorder_cache(self, beam_idx) -> None:
            if self.key_buffer is not None:
                index = beam_idx.to(self.key_buffer.device)
                self.key_buffer = self.key_buffer.index_select(0, index)
                self.value_buffer = self.value_buffer.index_select(0, index)
                self._views()

        def batch_repeat_interleave(self, repeats: int) -> None:
            if self.key_buffer is not None:
                self.key_buffer = self.key_buffer.repeat_interleave(repeats, dim=0)
                self.value_buffer = self.value_buffer.repeat_interleave(repeats, dim=0)
                self._views()

        def crop(self, tokens_to_remove: int) -> None:
            if tokens_to_remove < 0 and self.length:
                self.length = max(0, self.length + tokens_to_remove)
                self._views()
            elif tokens_to_remove > 0:
                super().crop(tokens_to_remove)

        def reset(self) -> None:
            self.length = 0
            self.key_buffer = self.value_buffer = None
            super().reset()

    return GrowingLayer


_GROWING: Any = None


def growing_layer(capacity: int):
    """A cache layer with room for `capacity` positions (transformers is imported on first use)."""
    global _GROWING
    if _GROWING is None:
        _GROWING = _layer_class()
    return _GROWING(capacity)


def rows_cache(prefixes: list[Any | None], capacity: int):
    """A cache for `len(prefixes)` rows decoded together, each with room for `capacity` positions, row i starting
    with the keys and values of `prefixes[i]` (a one-row `DynamicCache` of leading tokens, or None). Prefixes of
    different lengths end at the same position, the room before a shorter one zero (the caller masks it)."""
    import torch
    from transformers import DynamicCache

    cache = DynamicCache()  # a DynamicCache to the model (its layers made here)
    cache.layer_class_to_replicate = lambda: growing_layer(capacity)  # type: ignore[assignment]  # any factory
    distinct = {id(p): p for p in prefixes if p is not None}
    if not distinct:
        return cache
    length = {key: p.get_seq_length() for key, p in distinct.items()}
    width = max(length.values())
    layers = []
    for n, sources in enumerate(zip(*(p.layers for p in distinct.values()))):
        layer = growing_layer(capacity)
        first = sources[0]
        if first.keys is not None and first.keys.numel():
            if len(distinct) == 1 and None not in prefixes:  # one prefix for every row: a broadcast view
                keys, values = first.keys.expand(len(prefixes), -1, -1, -1), first.values.expand(len(prefixes), -1, -1, -1)
            else:
                shape = (len(prefixes), first.keys.shape[1], width, first.keys.shape[3])
                keys, values = first.keys.new_zeros(shape), first.values.new_zeros(shape)
                for key, source in zip(distinct, sources):
                    at = torch.tensor([i for i, p in enumerate(prefixes) if id(p) == key], device=keys.device)
                    keys[at, :, width - length[key] :] = source.keys
                    values[at, :, width - length[key] :] = source.values
            layer.update(keys, values)
        layers.append(layer)
    cache.layers = layers  # layers past the prefixes', if any, made on first use
    return cache


def empty_rows_cache(like: Any, rows: int, capacity: int, length: int):
    """A cache of `rows` rows with room for `capacity` positions, its first `length` filled with zeros (masked room
    that `place_rows` fills), its layers shaped as those of `like`."""
    from transformers import DynamicCache

    cache = DynamicCache()
    layers = []
    for source in like.layers:
        layer = growing_layer(capacity)
        shape = (rows, source.keys.shape[1], capacity, source.keys.shape[3])
        layer.key_buffer, layer.value_buffer = source.keys.new_zeros(shape), source.values.new_zeros(shape)
        layer.device, layer.is_initialized, layer.length = source.keys.device, True, length
        layer._views()
        layers.append(layer)
    cache.layers = layers
    cache.layer_class_to_replicate = lambda: growing_layer(capacity)  # type: ignore[assignment]  # any factory
    return cache


def place_rows(cache: Any, part: Any, rows: Any, spans: list[tuple[int, int, int]]) -> None:
    """Copies `part`'s keys and values into rows `rows` of `cache` (made by `empty_rows_cache`): positions
    [start, end) of `part` to those from `to` on, for each (start, end, to) of `spans`."""
    for target, source in zip(cache.layers, part.layers):
        for start, end, to in spans:
            if end > start:
                target.key_buffer[rows, :, to : to + end - start] = source.keys[:, :, start:end]
                target.value_buffer[rows, :, to : to + end - start] = source.values[:, :, start:end]
