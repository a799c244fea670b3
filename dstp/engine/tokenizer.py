"""The checkpoint's own tokenizer, loaded once per owner.

HF tokenizers are not safe to share between threads, so the engine thread
(detokenising) and the HTTP threads (encoding, chat templates) each load
their own copy.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("dstp")


def load_tokenizer(model: str, trust_remote_code: bool = False) -> Any | None:
    """The tokenizer in ``model``'s folder, or None (the model then takes token ids only)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError) as exc:
        log.warning("no tokenizer in %s (%s): token ids only", model, exc)
        return None
