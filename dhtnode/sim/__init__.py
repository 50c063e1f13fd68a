"""Discrete-event simulated network driving the same sans-I/O protocol code, for tests and benchmarks."""
