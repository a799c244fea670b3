"""Sampling, split by job: per-sequence state, penalties, filters, the draw, logprobs and
the one readback. The engine uses ``sample`` with a ``SampleState`` per row."""

from dstp.engine.sampling.sampler import NothingToDraw, Picks, SamplingError, sample
from dstp.engine.sampling.state import SampleState, make_generator

__all__ = ["NothingToDraw", "Picks", "SampleState", "SamplingError", "make_generator", "sample"]
