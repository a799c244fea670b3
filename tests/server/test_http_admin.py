"""/v1/models, /health, /metrics, /version, /tokenize and /detokenize over HTTP.

The real EngineLoop, Flask app and waitress server run in-process with a deterministic
fake engine (tests/helpers/fake_engine.py), so these are fast and exact; the fixtures
``main`` and ``strict`` are in conftest.py. The real engine behind the same server:
test_server_e2e.py.
"""

from __future__ import annotations

import openai
import pytest
import requests

from tests.helpers.server_helpers import (
    chat_ids,
    openai_client,
    parse_metrics,
)


def test_models_health_metrics(main):
    engine, loop, url = main
    models = openai_client(url).models.list()
    assert [m.id for m in models.data] == ["fake-model"]
    assert openai_client(url).models.retrieve("fake-model").id == "fake-model"
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        openai_client(url).models.retrieve("gpt-4")
    from dstp import __version__

    assert requests.get(f"{url}/version", timeout=5).json() == {"version": __version__}
    assert requests.get(f"{url}/health", timeout=5).json()["status"] == "ok"
    metrics = parse_metrics(requests.get(f"{url}/metrics", timeout=5).text)
    assert metrics["dstp:kv_cache_usage_perc"] == 1 - engine.free_blocks / engine.num_blocks
    hits, queries = (
        metrics["dstp:prefix_cache_hits_total"],
        metrics["dstp:prefix_cache_queries_total"],
    )
    assert hits / queries == pytest.approx(0.4)


def test_tokenize_detokenize_round_trip(main):
    engine, _, url = main
    tok = engine.tokenizer
    for text in ["hello world", "The quick brown fox", "  spaces  and\nnewlines", "é ü"]:
        got = requests.post(f"{url}/tokenize", json={"prompt": text}, timeout=10).json()
        assert got["tokens"] == tok.encode(text) and got["count"] == len(got["tokens"])
        assert got["max_model_len"] == engine.max_model_len and got["token_strs"] is None
        raw = requests.post(
            f"{url}/tokenize",
            json={"prompt": text, "add_special_tokens": False, "return_token_strs": True},
            timeout=10,
        ).json()
        assert raw["tokens"] == tok.encode(text, add_special_tokens=False)
        assert raw["token_strs"] == tok.convert_ids_to_tokens(raw["tokens"])
        back = requests.post(f"{url}/detokenize", json={"tokens": got["tokens"]}, timeout=10)
        assert back.json() == {"prompt": tok.decode(got["tokens"])}
    messages = [{"role": "user", "content": "hi there"}]
    chat = requests.post(f"{url}/tokenize", json={"messages": messages}, timeout=10).json()
    assert chat["tokens"] == chat_ids(engine, messages)
    for body, param in [
        ({}, "prompt"),
        ({"prompt": "a", "messages": messages}, "prompt"),
        ({"prompt": 5}, "prompt"),
        ({"prompt": "a", "frobnicate": 1}, "frobnicate"),
    ]:
        resp = requests.post(f"{url}/tokenize", json=body, timeout=10)
        assert resp.status_code == 400 and resp.json()["error"]["param"] == param, resp.text
    for tokens in ([1, 10**9], "abc", None):
        resp = requests.post(f"{url}/detokenize", json={"tokens": tokens}, timeout=10)
        assert resp.status_code == 400 and resp.json()["error"]["param"] == "tokens"
