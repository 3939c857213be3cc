"""What the Triton kernel families share: their autotune configurations' shape."""
from __future__ import annotations

import triton


def tile_config(bm: int, bn: int, bk: int, stages: int, warps: int) -> triton.Config:
    """A BLOCK_M x BLOCK_N x BLOCK_K tile, grouped 8 row-blocks at a time (L2 reuse of the weight)."""
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                         num_stages=stages, num_warps=warps)
