"""What an array was read from, looked up by the array's identity.

Every layer reads its weights as plain arrays (``w[...]``), so whatever comes next (a reshape, a slice, a
``shard_map``, a grouped matmul) sees an array. A few consumers gain from knowing where that very array came
from: the FP8 values and scales a dequantized weight was computed from (`moe_jax.model.quant.fp8_source`), or
the stacked parameter and the layer index an unrolled layer's weight was sliced from
(`layer_source`: a Pallas kernel reads the layer in place, where XLA would copy the slice
out for the kernel's operand). A `Provenance` keeps that note beside the array, not in a wrapper type; an
array derived from it (sliced, reshaped, passed into a ``shard_map``) is a new object and has no note.
"""

from __future__ import annotations

import weakref


class Provenance:
    """Notes on arrays, keyed by identity: ``note(a, *source)``, then ``of(a)`` gives ``source`` for that very
    object, None for any other. A note leaves when its array is collected (a traced value lives as long as the
    trace that made it), so notes never outlive their arrays nor attach to a new object at a reused id."""

    def __init__(self):
        self._notes: dict[int, tuple[weakref.ref, tuple]] = {}

    def note(self, array, *source) -> None:
        """Record that `array` was made from `source`."""
        key = id(array)

        def forget(ref, key=key):
            if self._notes.get(key, (None,))[0] is ref:      # not a note made since for a new object at this id
                del self._notes[key]

        self._notes[key] = (weakref.ref(array, forget), source)

    def of(self, array) -> tuple | None:
        """The source noted for this very `array`, else None."""
        entry = self._notes.get(id(array))
        if entry is None or entry[0]() is not array:
            return None
        return entry[1]


_LAYER_SLICES = Provenance()
"""Each unrolled layer's slice of a stacked parameter → (the stacked parameter, the layer's index)."""


def layer_of(stacked, index: int):
    """``stacked[index]``: one layer's slice of a stacked parameter [L, ...], noted for `layer_source`."""
    sliced = stacked[index]
    _LAYER_SLICES.note(sliced, stacked, index)
    return sliced


def layer_source(w) -> tuple | None:
    """(stacked [L, ...], index) when `w` is the very slice `layer_of` returned (an unrolled layer's parameter as
    it read it), else None (a scanned layer's slice, or anything computed from the read).

    Why: a custom call's operand is a buffer of its own, so XLA copies a slice out of the stacked parameter for a
    Pallas kernel every step (qwen3-30b-a3b on one H200, dropless decode at batch 64: each layer's 1.2 GB of
    expert weights copied, 2.75x the bytes the step needs); given the stacked parameter and the index, the
    kernel reads the layer where it is stored (`moe_jax.model.moe.grouped_kernel.tiled_matmul`)."""
    return _LAYER_SLICES.of(w)


__all__ = ["Provenance", "layer_of", "layer_source"]
