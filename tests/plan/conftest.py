"""Shared fixtures for the planner tests."""

import pytest

from latentmoe.plan.arch import arch_from_hf_dict
from tests.plan.helpers import tiny_llama_config


@pytest.fixture
def tiny_llama():
    return arch_from_hf_dict(tiny_llama_config(), "tiny-llama")
