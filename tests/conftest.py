"""Fixtures shared by every test directory."""

from __future__ import annotations

import pytest
import torch

from tiny import device_under_test


@pytest.fixture(scope="session")
def device() -> torch.device:
    """The device of ``$RECURSIFY_TEST_DEVICE`` (default cpu); see ``tiny.device_under_test``."""
    return device_under_test()
