"""``dstp serve`` / ``python -m dstp serve`` flags: vLLM's command line with vLLM's meanings,
dstp's own names kept, and what each flag reaches (engine settings, server config, requests)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

from dstp.engine.config import ALLOW_LONG_ENV, EngineConfig, checkpoint_dtype, resolve_dtype
from dstp.server import cli
from dstp.server.cli import FlagError, build_parser, check_args
from dstp.server.defaults import SamplingDefaults, generation_defaults
from tests.helpers.launcher import REPO

VLLM_LINE = [
    "--model",
    "meta-llama/Llama-3.2-1B-Instruct",
    "--revision",
    "main",
    "--download-dir",
    "/models/hf",
    "-tp",
    "2",
    "--dtype",
    "half",
    "--seed",
    "7",
    "--chat-template",
    "{{ messages[0]['content'] }}",
    "--no-enable-prefix-caching",
    "--served-model-name",
    "llama",
    "llama-3.2",
    "--enable-log-requests",
    "--generation-config",
    "vllm",
    "--max-model-len",
    "4096",
    "--max-num-seqs",
    "32",
    "--max-num-batched-tokens",
    "1024",
    "--gpu-memory-utilization",
    "0.85",
    "--trust-remote-code",
    "--host",
    "0.0.0.0",
    "--port",
    "8001",
    "--api-key",
    "k",
]


def parse(*argv: str, world: int = 1):
    args = build_parser().parse_args(list(argv))
    check_args(args, world)
    return args


def test_vllm_command_line():
    args = parse(*VLLM_LINE, world=2)
    assert args.model == "meta-llama/Llama-3.2-1B-Instruct"
    assert (args.revision, args.download_dir) == ("main", "/models/hf")
    assert args.tensor_parallel_size == 2 and args.dtype == "half" and args.seed == 7
    assert args.chat_template_text == "{{ messages[0]['content'] }}"
    assert args.prefix_caching is False
    assert args.served_model_name == ["llama", "llama-3.2"]
    assert args.enable_log_requests is True and args.generation_config == "vllm"
    assert (args.max_model_len, args.max_num_seqs, args.max_num_batched_tokens) == (4096, 32, 1024)
    assert args.gpu_memory_utilization == 0.85 and args.trust_remote_code
    assert (args.host, args.port, args.api_key) == ("0.0.0.0", 8001, "k")


def test_long_tp_flag_and_dstp_names_still_work():
    args = parse(
        "--tensor-parallel-size", "2", "--no-prefix-caching", "--dtype", "float32", world=2
    )
    assert args.tensor_parallel_size == 2 and args.prefix_caching is False
    assert args.dtype == "float32"


def test_defaults_match_vllm():
    args = parse()
    assert args.model is None and args.dtype == "auto" and args.seed is None
    assert args.tensor_parallel_size is None and args.prefix_caching is True
    assert args.enable_log_requests is False and args.generation_config == "auto"
    assert args.served_model_name is None and args.chat_template_text is None
    assert parse("--disable-log-requests").enable_log_requests is False


@pytest.mark.parametrize(
    ("argv", "enabled"),
    [
        ([], True),
        (["--enable-prefix-caching"], True),
        (["--no-enable-prefix-caching"], False),
        (["--no-prefix-caching"], False),
    ],
)
def test_prefix_caching_switches(argv, enabled):
    assert parse(*argv).prefix_caching is enabled


def test_prefix_caching_contradiction():
    with pytest.raises(FlagError, match="contradict"):
        parse("--enable-prefix-caching", "--no-prefix-caching")


@pytest.mark.parametrize("dtype", ["auto", "half", "float16", "bfloat16", "float", "float32"])
def test_every_vllm_dtype_parses(dtype):
    assert parse("--dtype", dtype).dtype == dtype


def test_unknown_dtype_is_refused(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--dtype", "int8"])
    assert "invalid choice" in capsys.readouterr().err


def test_dtype_meanings(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"torch_dtype": "bfloat16"}))
    assert resolve_dtype("auto", tmp_path) == "bfloat16"
    (tmp_path / "config.json").write_text(json.dumps({"dtype": "float16", "torch_dtype": "x"}))
    assert checkpoint_dtype(tmp_path) == "float16"
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert resolve_dtype("auto", tmp_path) == "float32"  # none declared: float32, as in vLLM
    assert resolve_dtype("half", tmp_path) == "float16"
    assert resolve_dtype("float", tmp_path) == "float32"
    assert resolve_dtype("bfloat16", tmp_path) == "bfloat16"
    import torch

    assert EngineConfig(model=str(tmp_path), dtype="auto").torch_dtype == torch.float32
    assert EngineConfig(model=str(tmp_path), dtype="half").torch_dtype == torch.float16
    with pytest.raises(ValueError, match="dtype must be one of"):
        _ = EngineConfig(model=str(tmp_path), dtype="int8").torch_dtype


def test_tp_size_against_the_launcher():
    parse("-tp", "2", world=2)
    parse("-tp", "2", world=4)  # two replicas of TP=2
    with pytest.raises(FlagError) as info:
        parse("-tp", "2", world=1)
    text = str(info.value)
    assert "does not fit the 1 rank(s) the launcher started" in text
    assert "deepspeed --num_gpus 2 --module dstp serve" in text
    assert "torchrun --nproc_per_node 2 -m dstp serve" in text and "\n" not in text
    with pytest.raises(FlagError, match=r"sizes that fit: \[1, 2, 4\]"):
        parse("-tp", "3", world=4)
    with pytest.raises(FlagError):
        parse("-tp", "0", world=4)


def test_chat_template_file_or_inline(tmp_path):
    file = tmp_path / "template.jinja"
    file.write_text("{% for m in messages %}{{ m['content'] }}\n{% endfor %}")
    assert parse("--chat-template", str(file)).chat_template_text == file.read_text()
    inline = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert parse("--chat-template", inline).chat_template_text == inline
    # one line with escaped newlines, as vLLM's docs write them
    assert parse("--chat-template", "{{ 'a' }}\\n{{ 'b' }}").chat_template_text == (
        "{{ 'a' }}\n{{ 'b' }}"
    )
    with pytest.raises(FlagError, match="neither a file nor a Jinja template"):
        parse("--chat-template", str(tmp_path / "missing.jinja"))


def test_tool_and_reasoning_flags_are_checked_at_start_up():
    with pytest.raises(FlagError, match="--enable-auto-tool-choice needs --tool-call-parser"):
        parse("--enable-auto-tool-choice")
    with pytest.raises(SystemExit):  # argparse names the valid choices
        parse("--tool-call-parser", "hermez")
    with pytest.raises(SystemExit):
        parse("--reasoning-parser", "o1")
    with pytest.raises(FlagError, match="--max-log-len"):
        parse("--max-log-len", "0")


def test_generation_config_flag_values(tmp_path):
    assert parse("--generation-config", str(tmp_path)).generation_config == str(tmp_path)
    with pytest.raises(FlagError, match="expected 'auto', 'vllm' or a folder"):
        parse("--generation-config", str(tmp_path / "nope"))
    with pytest.raises(FlagError, match="--seed"):
        parse("--seed", "-1")


def test_generation_defaults_read_like_vllm(tmp_path):
    (tmp_path / "generation_config.json").write_text(
        json.dumps(
            {
                "do_sample": True,
                "temperature": 0.6,
                "top_p": 0.9,
                "top_k": 0,
                "repetition_penalty": 50.0,  # outside what a request may send: dropped
                "max_new_tokens": 64,
                "bos_token_id": 1,
            }
        )
    )
    assert generation_defaults(tmp_path) == {"temperature": 0.6, "top_p": 0.9, "top_k": -1}
    assert generation_defaults(tmp_path / "absent") == {}


def test_sampling_defaults_fill_what_a_request_leaves_out():
    defaults = SamplingDefaults({"temperature": 0.6, "top_p": 0.9}, seed=7)
    first = defaults.fill({"temperature": 0.0})
    assert first["temperature"] == 0.0 and first["top_p"] == 0.9 and isinstance(first["seed"], int)
    second = defaults.fill({})
    assert second["seed"] != first["seed"]  # each request its own draw ...
    again = SamplingDefaults({}, seed=7)  # ... and the same sequence for the same --seed
    assert [again.fill({})["seed"] for _ in range(2)] == [first["seed"], second["seed"]]
    assert defaults.fill({"seed": 3})["seed"] == 3
    assert SamplingDefaults().fill({"top_k": 5}) == {"top_k": 5}


def test_requests_get_the_server_defaults():
    from dstp.server.protocol import parse_generate

    body = {"prompt_token_ids": [1, 2, 3], "max_tokens": 4}
    defaults = SamplingDefaults({"temperature": 0.5, "top_k": 20}, seed=11)
    params = parse_generate(dict(body), 100, 64, defaults).params
    assert (params.temperature, params.top_k) == (0.5, 20) and params.seed is not None
    params = parse_generate({**body, "temperature": 1.5, "seed": 4}, 100, 64, defaults).params
    assert (params.temperature, params.top_k, params.seed) == (1.5, 20, 4)
    params = parse_generate(dict(body), 100, 64).params
    assert (params.temperature, params.top_k, params.seed) == (1.0, -1, None)


def test_flags_reach_the_server_config():
    from dstp.server.serve import _apply_chat_template, _server_config

    args = parse(
        "--model",
        "org/m",
        "--served-model-name",
        "a",
        "b",
        "--enable-log-requests",
        "--max-log-len",
        "7",
        "--tool-call-parser",
        "pythonic",
        "--enable-auto-tool-choice",
        "--reasoning-parser",
        "qwen3",
        world=1,
    )
    engine = SimpleNamespace(
        model_name="a",
        max_model_len=64,
        vocab_size=100,
        eos_ids=frozenset({2}),
        tp=SimpleNamespace(size=1),
        config=SimpleNamespace(block_size=16),
    )
    config = _server_config(args, engine, "/cache/models--org--m/snapshots/x", None)
    assert config.model_name == "a" and config.log_requests is True and config.block_size == 16
    assert config.max_log_len == 7 and config.eos_ids == {2}
    assert (config.tools.parser, config.tools.auto, config.reasoning_parser) == (
        "pythonic",
        True,
        "qwen3",
    )
    assert set(config.model_aliases) == {"b", "org/m", "/cache/models--org--m/snapshots/x"}
    # no --served-model-name: the --model value as given (the hub id, not the snapshot path)
    config = _server_config(parse("--model", "org/m"), engine, "/snap", None)
    assert config.model_name == "org/m" and "/snap" in config.model_aliases
    assert config.sampling_defaults.seed is None and config.sampling_defaults.fields == {}
    seeded = _server_config(parse("--seed", "5", "--generation-config", "vllm"), engine, "/m", None)
    assert seeded.sampling_defaults.seed == 5
    tokenizer = SimpleNamespace(chat_template=None)
    _apply_chat_template(parse("--chat-template", "{{ 'x' }}"), tokenizer)
    assert tokenizer.chat_template == "{{ 'x' }}"


def test_module_entry_point_help():
    """``python -m dstp serve`` (what ``deepspeed --module`` and ``torchrun -m`` run)."""
    proc = subprocess.run(
        [sys.executable, "-m", "dstp", "serve", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "python -m dstp serve" in proc.stdout and "--tensor-parallel-size" in proc.stdout


def test_tp_mismatch_exits_with_one_line():
    proc = subprocess.run(
        [sys.executable, "-m", "dstp", "serve", "-tp", "2", "--port", "0"],
        cwd=REPO,
        env={**os.environ, "WORLD_SIZE": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "deepspeed --num_gpus 2" in errors[0], proc.stderr[-2000:]


def test_every_flag_has_a_help_text():
    parser = cli.build_parser()
    for action in parser._actions:
        assert action.help and len(action.help) > 10, action.option_strings


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--max-num-seqs", "0"], "--max-num-seqs"),
        (["--max-num-seqs", "-4"], "--max-num-seqs"),
        (["--max-num-batched-tokens", "0"], "--max-num-batched-tokens"),
        (["--max-num-batched-tokens", "-1"], "--max-num-batched-tokens"),
        (["--block-size", "0"], "--block-size"),
        (["--num-kv-blocks", "0"], "--num-kv-blocks"),
        (["--max-model-len", "1"], "--max-model-len"),
        (["--max-body-bytes", "0"], "--max-body-bytes"),
        (["--port", "-1"], "--port"),
        (["--port", "65536"], "--port"),
        (["--kv-cache-memory", "0.0"], "--kv-cache-memory"),
        (["--rank-timeout", "0.0"], "--rank-timeout"),
        (["--heartbeat-interval", "-1.0"], "--heartbeat-interval"),
        (["--step-timeout", "0.0"], "--step-timeout"),
        (["--request-read-timeout", "0.0"], "--request-read-timeout"),
        (["--gpu-memory-utilization", "0.0"], "--gpu-memory-utilization"),
        (["--gpu-memory-utilization", "1.01"], "--gpu-memory-utilization"),
        (["--gpu-memory-utilization", "-0.5"], "--gpu-memory-utilization"),
    ],
)
def test_unusable_numbers_fail_at_start_naming_the_fix(argv, flag):
    """vLLM's behaviour: a value the engine cannot run with is refused before anything
    starts (0 sequences or tokens per step used to admit requests that never ran)."""
    with pytest.raises(FlagError) as info:
        parse(*argv)
    text = str(info.value)
    assert text.startswith(f"{flag} {argv[1]} ") and "\n" not in text, text
    assert "pass " in text  # the fix: what to pass instead


@pytest.mark.parametrize(
    ("launcher_args", "names"),
    [
        ("--master_port abc", "not a TCP port: pass 1-65535"),
        ("--master_port=70000", "not a TCP port: pass 1-65535"),
        ("--master_port=0", "not a TCP port: pass 1-65535"),
        ('--hostfile "hosts', "does not split into shell words"),
    ],
)
def test_launcher_args_are_checked_at_start(launcher_args, names):
    """The supervised front-end reads --master_port from --launcher-args; a bad one used to
    raise a bare ValueError only when the first engine job started."""
    with pytest.raises(FlagError, match=names) as info:
        parse(f"--launcher-args={launcher_args}")
    assert str(info.value).startswith("--launcher-args ") and "\n" not in str(info.value)
    assert parse("--launcher-args=--master_port 29600 --include localhost:0,1")


def test_edge_values_are_accepted():
    args = parse("--max-num-seqs", "1", "--max-num-batched-tokens", "1", "--block-size", "1")
    assert (args.max_num_seqs, args.max_num_batched_tokens, args.block_size) == (1, 1, 1)
    assert parse("--gpu-memory-utilization", "1").gpu_memory_utilization == 1.0
    assert parse("--port", "0", "--max-model-len", "2").port == 0


def _llama_config(**kw):
    from transformers import LlamaConfig

    return LlamaConfig(**{"max_position_embeddings": 512, "vocab_size": 512, **kw})


def test_max_model_len_above_the_trained_context_is_refused(monkeypatch, caplog):
    monkeypatch.delenv(ALLOW_LONG_ENV, raising=False)
    cli.check_model_args(parse("--max-model-len", "512"), _llama_config(eos_token_id=2))
    cli.check_model_args(parse(), _llama_config(eos_token_id=2))  # the model's own
    with pytest.raises(FlagError) as info:
        cli.check_model_args(parse("--max-model-len", "1024"), _llama_config(eos_token_id=2))
    text = str(info.value)
    assert text.startswith("--max-model-len 1024 exceeds the model's max_position_embeddings 512")
    assert "--max-model-len 512 or less" in text and "DSTP_ALLOW_LONG_MAX_MODEL_LEN=1" in text
    monkeypatch.setenv(ALLOW_LONG_ENV, "1")  # vLLM's override, under dstp's name
    cli.check_model_args(parse("--max-model-len", "1024"), _llama_config(eos_token_id=2))
    assert "DSTP_ALLOW_LONG_MAX_MODEL_LEN" in caplog.text


def test_eos_ids_outside_the_vocabulary_are_refused():
    with pytest.raises(FlagError, match=r"eos_token_id \[600\] in config.json .*\[0, 512\)"):
        cli.check_model_args(parse(), _llama_config(eos_token_id=600))
    with pytest.raises(FlagError, match=r"eos_token_id \[-1\] in generation_config.json"):
        cli.check_model_args(parse(), _llama_config(eos_token_id=2), [2, -1])
    cli.check_model_args(parse(), _llama_config(eos_token_id=[1, 2]), 2)


def test_model_checks_read_the_checkpoint(tmp_path):
    """serve's wiring: config.json and generation_config.json of the folder it serves."""
    from dstp.server.serve import _check_model
    from tests.helpers.tiny_models import STORIES

    for item in ("config.json", "generation_config.json"):
        if (STORIES / item).is_file():
            (tmp_path / item).write_text((STORIES / item).read_text())
    _check_model(parse("--max-model-len", "512"), str(tmp_path))
    with pytest.raises(FlagError, match="max_position_embeddings 512"):
        _check_model(parse("--max-model-len", "513"), str(tmp_path))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 512}))
    with pytest.raises(FlagError, match="generation_config.json"):
        _check_model(parse(), str(tmp_path))


def test_model_check_exits_with_one_line():
    """The whole path: the built-in stories260K (512 positions) refuses --max-model-len 4096."""
    proc = subprocess.run(
        [sys.executable, "-m", "dstp", "serve", "--max-model-len", "4096", "--port", "0"],
        cwd=REPO,
        env={k: v for k, v in os.environ.items() if k != ALLOW_LONG_ENV} | {"WORLD_SIZE": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "--max-model-len 4096" in errors[0], proc.stderr[-2000:]


@pytest.mark.parametrize("argv, fused", [([], True), (["--no-fused-layers"], False)])
def test_no_fused_layers_reaches_the_engine_config(argv, fused, tmp_path):
    from dstp.server.serve import _engine_config

    args = parse("--dtype", "float32", *argv)
    assert args.no_fused_layers is not fused
    assert _engine_config(args, str(tmp_path)).fused_layers is fused
    assert EngineConfig(model="m").fused_layers is True


@pytest.mark.parametrize("argv, backend", [([], None), (["--compile-decode"], "eager")])
def test_compile_decode_reaches_the_engine_config(argv, backend, tmp_path):
    from dstp.server.serve import _engine_config

    args = parse("--dtype", "float32", *argv)
    assert _engine_config(args, str(tmp_path)).compile_decode == backend
    assert EngineConfig(model="m").compile_decode is None  # off by default


@pytest.mark.parametrize(
    "argv, graphs", [([], None), (["--cuda-graphs"], True), (["--enforce-eager"], False)]
)
def test_cuda_graphs_reaches_the_engine_config(argv, graphs, tmp_path):
    """None: graphs where they run (the runner's call), True: asked for, False: never."""
    from dstp.server.serve import _engine_config

    config = _engine_config(parse("--dtype", "float32", *argv), str(tmp_path))
    assert config.cuda_graphs is graphs
    assert config.fixed_shape_decode is (graphs is True)


def test_cuda_graphs_and_enforce_eager_are_exclusive(capsys):
    with pytest.raises(SystemExit):
        parse("--cuda-graphs", "--enforce-eager")
    assert "not allowed with argument" in capsys.readouterr().err
