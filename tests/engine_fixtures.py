"""The input tests run on every engine: a test module that imports these fixtures replaces conftest's
torch-only `text_model` / `image_model` with one of each per engine (module scope)."""

from __future__ import annotations

import pytest

from conftest import ENGINES, load_on_engine


@pytest.fixture(scope="module", params=ENGINES)
def engine(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def text_model(registered, engine):
    return load_on_engine(registered["models"]["text"]["uri"], engine)


@pytest.fixture(scope="module")
def image_model(registered, engine):
    return load_on_engine(registered["models"]["image"]["uri"], engine)
