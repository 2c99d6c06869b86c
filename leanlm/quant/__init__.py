"""Quantized weight formats and kernels."""
