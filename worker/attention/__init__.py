"""Paged attention: batch metadata, the torch reference ops and the Triton kernels."""
