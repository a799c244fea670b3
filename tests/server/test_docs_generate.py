"""docs/serving.md names /generate's request fields and answer keys as the server has them."""

from __future__ import annotations

from pathlib import Path

from dstp.server.protocol import GENERATE_FIELDS

DOC = Path(__file__).resolve().parents[2] / "docs" / "serving.md"


def test_generate_section_names_every_field_and_answer_key():
    section = DOC.read_text().split("### /generate", 1)[1].split("\n### ", 1)[0]
    missing = [name for name in GENERATE_FIELDS if f"`{name}`" not in section]
    assert not missing, f"/generate fields not in docs/serving.md: {missing}"
    # the keys serving.py's _Generate answers with, streamed and not
    for key in (
        "request_id",
        "prompt_token_ids",
        "outputs",
        "usage",
        "index",
        "token_ids",
        "text",
        "finish_reason",
        "stop_reason",
        "logprobs",
        "new_token_ids",
        "delta_text",
        "token_id",
        "logprob",
        "top",
    ):
        assert f'"{key}"' in section or f"`{key}`" in section, key
