"""Fixtures of the builder tests."""

from __future__ import annotations

import pytest
import torch

from llmbuild.builder.quality import held_out_windows
from tests.builder.quantization_fixtures import DEMO


@pytest.fixture(scope="session")
def held_out() -> list[torch.Tensor]:
    """The quality gate's windows of the demo model's held-out text (8 x 256 tokens)."""
    return held_out_windows(DEMO, 8, 256)
