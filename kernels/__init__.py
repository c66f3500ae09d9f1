"""Triton kernels of fastdiff (imported as ``fastdiff.kernels``).

Triton is optional: importing a kernel module without Triton installed raises ImportError,
and ``fastdiff.ops`` then falls back to its other backends.
"""
