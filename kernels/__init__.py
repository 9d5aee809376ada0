"""Triton kernels, shipped as ``lorakit.kernels`` (see lorakit.ops for the torch reference they must match)."""
