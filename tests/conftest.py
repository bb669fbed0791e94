"""Shared fixtures (kept small)."""

import pytest


@pytest.fixture(scope="session")
def smollm():
    """The embedded SmolLM2-135M-Instruct, loaded once per session (LoadedModel)."""
    from waferllm.models.loader import load_model

    return load_model()


@pytest.fixture(scope="session")
def smollm_reference(smollm):
    """A ReferenceEngine on the shared SmolLM2 (layers materialised once)."""
    from waferllm.engine.reference import ReferenceEngine

    return ReferenceEngine(smollm)
