"""Server-wide sampling defaults (``--generation-config``, ``--seed``): what a request that
leaves a sampling field out gets. The server's config object carries one instance."""

from __future__ import annotations

import json
import logging
import random
import threading
from pathlib import Path

from dstp.engine.sampling_params import InvalidRequest, SamplingParams

log = logging.getLogger("dstp")

# generation_config.json keys that set a request's default, as vLLM reads them.
GENERATION_CONFIG_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def generation_defaults(folder: str | Path) -> dict[str, object]:
    """The sampling defaults a folder's ``generation_config.json`` sets explicitly (only the
    keys it names: transformers' implicit defaults such as top_k=50 do not count, as in
    vLLM). Values a request could not carry either are dropped with a warning."""
    file = Path(folder) / "generation_config.json"
    try:
        config = json.loads(file.read_text()) if file.is_file() else {}
    except (OSError, ValueError) as exc:
        log.warning("ignoring %s: %s", file, exc)
        return {}
    found = {k: config[k] for k in GENERATION_CONFIG_KEYS if config.get(k) is not None}
    if found.get("top_k") == 0:
        found["top_k"] = -1  # HF's "off"
    for key in list(found):
        try:
            SamplingParams(**{key: found[key]})
        except (InvalidRequest, TypeError) as exc:
            log.warning("ignoring %s's %s: %s", file, key, exc)
            del found[key]
    return found


class SamplingDefaults:
    """The generation config's values, and (with ``--seed``) a seed drawn from one generator
    seeded once, as vLLM seeds its global generator: a server run answers the same sequence
    of requests the same way, while two requests still draw different samples."""

    def __init__(self, fields: dict[str, object] | None = None, seed: int | None = None) -> None:
        self.fields = dict(fields or {})
        self.seed = seed
        self._seeds = random.Random(seed) if seed is not None else None
        self._lock = threading.Lock()

    def fill(self, given: dict[str, object]) -> dict[str, object]:
        """``given`` (the request's own fields) completed with these defaults."""
        out = {**self.fields, **given}
        if self._seeds is not None and out.get("seed") is None:
            with self._lock:
                out["seed"] = self._seeds.getrandbits(63)
        return out
