"""Shared fixtures: a tiny random llama (no download) and small-round settings in isolated homes."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import build_tiny_model, write_tiny_config


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture
def tiny_config(tmp_path, tiny_model_dir) -> Path:
    """A settings file for a small round on the tiny model, in an isolated home folder."""
    return write_tiny_config(tmp_path, tiny_model_dir)
