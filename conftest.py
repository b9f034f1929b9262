"""Test configuration: 8 fake CPU devices (set before JAX is imported) and a float64 fixture."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flag = "--xla_force_host_platform_device_count=8"
if _flag not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()

from dpok_jax.xla_flags import ensure_cpu_collective_order  # noqa: E402 (imports only os)

ensure_cpu_collective_order()

import jax  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def x64():
    """Float64 inside the test only (context-managed, never a global toggle left on)."""
    with jax.enable_x64(True):
        yield
