"""Fixtures of the bad-input battery: a valid adapter to damage, a mergeable pair, pristine bytes."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from .helpers import (
    CONFIG,
    WEIGHTS,
)


@pytest.fixture(scope="module")
def source_adapter(adapter_factory) -> Path:
    return adapter_factory(seed=101, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])


@pytest.fixture
def clean(source_adapter, tmp_path) -> Path:
    """A private copy of a valid adapter, to damage."""
    return Path(shutil.copytree(source_adapter, tmp_path / "victim"))


@pytest.fixture
def pair(adapter_factory) -> list[Path]:
    return [adapter_factory(r=4, target_modules=["q_proj"]), adapter_factory(r=4, target_modules=["q_proj"])]


@pytest.fixture(scope="module")
def pristine(source_adapter) -> tuple[bytes, bytes]:
    return (source_adapter / CONFIG).read_bytes(), (source_adapter / WEIGHTS).read_bytes()
