from __future__ import annotations

import pytest

from processor.sandbox.harness import hostile_world


@pytest.fixture
async def world(tmp_path):
    """The sandbox and a fake Ollama/OpenAI on loopback; daemons started through it are
    stopped at the end."""
    async with hostile_world(tmp_path) as w:
        yield w
