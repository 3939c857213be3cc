"""What the Triton kernel families share: their autotune configurations' shape."""
from __future__ import annotations

import os

import triton


def tile_config(bm: int, bn: int, bk: int, stages: int, warps: int) -> triton.Config:
    """A BLOCK_M x BLOCK_N x BLOCK_K tile, grouped 8 row-blocks at a time (L2 reuse of the weight)."""
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                         num_stages=stages, num_warps=warps)


def to_time(configs: list) -> list:
    """The configs the autotuner times for a new key: all that fit the call, or only the first where
    TORCHSLIM_TRITON_AUTOTUNE=0 (test runs on a GPU: one compile per kind of call instead of one per
    config; results stay correct, only the speed of the chosen tile is not the best)."""
    if os.environ.get("TORCHSLIM_TRITON_AUTOTUNE", "1").strip() == "0":
        return configs[:1]
    return configs
