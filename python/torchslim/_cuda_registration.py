"""Registers the Triton kernels as the CUDA implementations of torchslim ops.

Done only where Triton is installed; without it a CUDA call raises NotImplementedError naming
the missing kernel (torch's dispatcher error), never a silent fallback.
"""
