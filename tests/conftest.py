"""Shared pytest setup: hypothesis profiles (CI runs without deadlines)."""

from __future__ import annotations

import os

from hypothesis import settings

settings.register_profile("ci", deadline=None, max_examples=200)
settings.register_profile("dev", deadline=None, max_examples=300)
settings.load_profile("ci" if os.environ.get("CI") else "dev")

# The in-process loopback network fixture (``net``) for the connect and forward tests.
pytest_plugins = ["tests.loopnet"]
