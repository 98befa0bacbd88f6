"""Session-wide tiny models for the pruning tests (built once; see tiny_vlms.py)."""

from __future__ import annotations

import pytest
from tiny_vlms import build_llava, build_llava_next, build_llava_onevision, build_qwen2vl, build_qwen25vl


@pytest.fixture(scope="session")
def llava():
    return build_llava()


@pytest.fixture(scope="session")
def llava_eager():
    return build_llava(attn="eager")


@pytest.fixture(scope="session")
def llava_next():
    return build_llava_next()


@pytest.fixture(scope="session")
def qwen2vl():
    return build_qwen2vl()


@pytest.fixture(scope="session")
def qwen25vl():
    return build_qwen25vl()


@pytest.fixture(scope="session")
def llava_onevision():
    return build_llava_onevision()


@pytest.fixture(scope="session")
def llava_onevision_interpolated():
    """anyres_max_1: the packing interpolates the unpadded crop grid down."""
    return build_llava_onevision(max_patches=1)
