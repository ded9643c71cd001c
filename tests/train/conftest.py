"""Fixtures of the train tests: small code-shard folders written through `core.codeshard`."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from code_folder import write_code_folder  # noqa: E402


@pytest.fixture
def code_folder(tmp_path: Path) -> Path:
    return write_code_folder(tmp_path / "codes")


@pytest.fixture
def make_code_folder():
    """The `write_code_folder` function, for tests that need several or custom folders."""
    return write_code_folder
