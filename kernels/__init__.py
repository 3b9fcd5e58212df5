"""Triton kernels (``kernels.triton_ops``) and their plain-torch references
(``kernels.reference``), function for function with the same signatures.

Importing this package imports neither triton nor the kernels: the CPU path needs only the
references, and triton may not be installed there.
"""
