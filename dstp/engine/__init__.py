"""Requests to steps to outputs, on the driver rank: the engine, its scheduler and block
allocator, sampling, detokenizing. ``from dstp.engine import Engine, EngineConfig,
SamplingParams`` is the Python API."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dstp.engine.config import EngineConfig
    from dstp.engine.llm_engine import Engine
    from dstp.engine.sampling_params import SamplingParams

__all__ = ["Engine", "EngineConfig", "SamplingParams"]
_HOMES = {
    "Engine": "dstp.engine.llm_engine",
    "EngineConfig": "dstp.engine.config",
    "SamplingParams": "dstp.engine.sampling_params",
}


def __getattr__(name: str):
    """Lazy, so importing one engine module does not import the model runner and torch."""
    if name not in _HOMES:
        raise AttributeError(f"module 'dstp.engine' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_HOMES[name]), name)
