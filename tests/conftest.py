"""Shared fixtures for the streamstate test suite."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

# CI machines are small and shared: no deadlines, a moderate number of examples.
settings.register_profile(
    "ci", deadline=None, max_examples=60, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("dev", deadline=None, max_examples=100)
settings.load_profile(os.environ.get("STREAMSTATE_HYPOTHESIS_PROFILE", "ci"))
