"""The server tests' fixtures: in-process servers on the fake engine (``main``, ``strict``),
and ONE real TP=2 server per session (``tp2_server``) that every module able to share it
uses, since each start of the ``deepspeed`` launcher costs tens of seconds on 2 cores."""

from __future__ import annotations

import pytest

from dstp.model.default_model import build_tokenizer
from tests.helpers.fake_engine import FakeEngine
from tests.helpers.server_helpers import API_KEY, ServerProcess, serve_fake, with_chat_template
from tests.helpers.tiny_models import STORIES

# A plain role-prefix template with one switch (``shout``) for chat_template_kwargs tests;
# without it, it renders exactly as server_helpers.SIMPLE_TEMPLATE.
# With ``tools`` it lists them and renders calls and results as Hermes-style templates do.
STORIES_TEMPLATE = (
    "{{ bos_token }}{% if tools %}tools: {{ tools | map(attribute='function.name') | join(', ') }}"
    "\n{% endif %}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}"
    "{% for c in m.tool_calls or [] %}<tool_call>{{ c.function | tojson }}</tool_call>{% endfor %}"
    "{{ ' (' ~ m.tool_call_id ~ ')' if m.tool_call_id else '' }}\n{% endfor %}"
    "{% if shout %}LOUD {% endif %}{% if add_generation_prompt %}assistant:{% endif %}"
)
# The shared server's flags: the union of what its users need. 96 KV blocks (1536 tokens a
# rank) make the fuzz's load preempt; 32 admitted requests let the e2e pressure test saturate
# the limit (48 threads); --enable-log-requests gives the request log lines prompt lists read;
# the tool flags serve test_structured_http.
TP2_ADMISSION_LIMIT = 32
TP2_NUM_KV_BLOCKS = 96
TP2_FLAGS = (
    "--num-kv-blocks",
    str(TP2_NUM_KV_BLOCKS),
    "--max-queued-requests",
    str(TP2_ADMISSION_LIMIT),
    "--enable-log-requests",
    "--tool-call-parser",
    "hermes",
    "--enable-auto-tool-choice",
)
KILLS_SERVER = "kills_tp2_server"  # the marker of a test that ends the shared server


@pytest.fixture(scope="module")
def main():
    """The main server: fake engine, no API key, default limits."""
    engine = FakeEngine(build_tokenizer())
    loop, server = serve_fake(engine)
    yield engine, loop, server.url
    loop.stop()
    server.close()


@pytest.fixture(scope="module")
def strict():
    """A server with an API key, a tiny queue and body limit, slow steps, no chat template."""
    tokenizer = build_tokenizer()
    tokenizer.chat_template = None
    engine = FakeEngine(tokenizer, step_delay_s=0.05)
    loop, server = serve_fake(
        engine, api_key=API_KEY, max_body_bytes=2048, loop={"max_queued_requests": 2}
    )
    yield engine, loop, server.url
    loop.stop()
    server.close()


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """stories260k (fp32 weights, linked) with :data:`STORIES_TEMPLATE` as its chat template."""
    return with_chat_template(STORIES, tmp_path_factory.mktemp("stories_chat"), STORIES_TEMPLATE)


@pytest.fixture(scope="session")
def tp2_server(model_dir, tmp_path_factory):
    """``deepspeed --num_gpus 2 launch/serve.py`` on :func:`model_dir`, served as 'stories'
    (not yet healthy: call ``wait_healthy()``, so a module can compute meanwhile)."""
    log_path = tmp_path_factory.mktemp("tp2_logs") / "server.log"
    proc = ServerProcess.stories_tp2(model_dir, log_path, *TP2_FLAGS)
    try:
        yield proc
    finally:
        proc.stop()


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", f"{KILLS_SERVER}: ends the shared TP=2 server; runs last")


def pytest_collection_modifyitems(config, items) -> None:
    """Tests that end the shared server run right after its last other user."""
    killers = [item for item in items if item.get_closest_marker(KILLS_SERVER)]
    rest = [item for item in items if item not in killers]
    users = [i for i, item in enumerate(rest) if "tp2_server" in getattr(item, "fixturenames", ())]
    if killers and users:
        items[:] = rest[: users[-1] + 1] + killers + rest[users[-1] + 1 :]
