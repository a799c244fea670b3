"""Structured outputs: grammars compiled by llguidance, one matcher per sequence, and the
token masks the sampler applies (why llguidance: benchmarks/FINDINGS.md)."""

from dstp.engine.structured.compiler import GrammarCompiler, GrammarError, compiler_for
from dstp.engine.structured.matcher import GrammarState, MaskJob

__all__ = ["GrammarCompiler", "GrammarError", "GrammarState", "MaskJob", "compiler_for"]
