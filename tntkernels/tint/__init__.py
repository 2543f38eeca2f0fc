"""TinT (Trainable Transformer in Transformer, arXiv 2307.01189): the simulated auxiliary linear
layer — Linear Forward / Backward / Descent run inside TinT's prefix embeddings with H_sim-split
linear maps (``tntkernels.hsim_split_linear``). See ``tntkernels.tint.linear`` and
docs/tint.md §2; a worked example on MiniLM-L6 weights is ``python -m
tntkernels.tint.minilm_example``.
"""
from .linear import (
    LinearBackward,
    LinearDescent,
    LinearDescentBackward,
    LinearForward,
    LinearLayout,
    embed,
    pack_linear,
    set_token_signal,
    unpack_linear,
)

__all__ = [
    "LinearLayout", "LinearForward", "LinearBackward", "LinearDescent", "LinearDescentBackward",
    "pack_linear", "unpack_linear", "embed", "set_token_signal",
]
