"""Discrete-event simulated network driving the real sans-I/O protocol code.

For tests and benchmarks.
"""
