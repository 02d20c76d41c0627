"""Kernels: quantized linear layers on torch's packed CPU kernels, with plain references."""
