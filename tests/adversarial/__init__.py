"""Attacks on a node, written as tests: each prints the figure it measures (``pytest -s``)."""
