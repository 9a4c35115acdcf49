"""C++ kernels for the CPU worker, compiled at first use (see compiler.py); the sources ship as package data."""
