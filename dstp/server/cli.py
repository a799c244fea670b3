"""``dstp serve``'s flags, shared with ``launch/serve.py``. Light on purpose: every rank
parses them, and only rank 0 loads the HTTP server.
"""

from __future__ import annotations

import argparse
import logging
import os

from dstp.engine.config import DTYPE_CHOICES
from dstp.server.limits import (
    DRAIN_MAX_BYTES,
    FAST_THREADS,
    IDLE_TIMEOUT_S,
    REQUEST_READ_TIMEOUT_S,
    RESERVE_THREADS,
    http_threads,
)

log = logging.getLogger("dstp")

_MIB = 1024 * 1024
# --help's description and epilog
USAGE = """``dstp serve`` / ``launch/serve.py``: start the engine on every rank, HTTP on rank 0.

Run it under a launcher that sets the rank environment::

    deepspeed --num_gpus 2 launch/serve.py --model PATH
    torchrun --nproc_per_node 2 launch/serve.py --model PATH
    dstp serve --model PATH                      # one process, TP=1

Every rank builds the engine (its shard of the model and of the KV cache).
Global rank 0 also owns the scheduler and serves HTTP with waitress; the other
ranks execute the steps rank 0 broadcasts. Stopping: SIGTERM or Ctrl-C on rank
0 fails in-flight requests with an error, releases the other ranks and exits.
If a rank dies, rank 0 notices (heartbeats when idle, a watchdog on every
collective), answers in-flight requests with an error and exits non-zero, so
the launcher ends the whole job instead of hanging.
"""


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's layout and appends each flag's default when it has one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and "default" not in text:
            text += " (default: %(default)s)"
        return text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The one flag definition shared by ``dstp serve`` and ``launch/serve.py``."""
    parser.formatter_class = _HelpFormatter
    _model_flags(parser.add_argument_group("model"))
    _engine_flags(parser.add_argument_group("engine"))
    _http_flags(parser.add_argument_group("HTTP"))
    _liveness_flags(parser.add_argument_group("liveness"))


def _model_flags(m: argparse._ArgumentGroup) -> None:
    m.add_argument(
        "--model",
        default=None,
        help="a Hugging Face checkpoint folder (config.json, *.safetensors, tokenizer) or a "
        "hub id such as meta-llama/Llama-3.2-1B, looked up in the Hugging Face cache first "
        "and fetched otherwise (safetensors, config, tokenizer and generation files only; "
        "nothing with HF_HUB_OFFLINE=1). Omitted: the built-in stories260K, a "
        "260K-parameter Llama trained on TinyStories (MIT) that ships with dstp and writes "
        "short children's stories. 'random': a small RANDOMLY INITIALISED Llama, generated "
        "once under ~/.cache/dstp/ (gibberish output; for benchmarks)",
    )
    m.add_argument(
        "--revision",
        default=None,
        help="branch, tag or commit of a hub --model (default: main)",
    )
    m.add_argument(
        "--download-dir",
        default=None,
        help="Hugging Face cache folder to find and fetch a hub --model in "
        "(default: $HF_HUB_CACHE, else ~/.cache/huggingface/hub)",
    )
    m.add_argument(
        "--served-model-name",
        nargs="+",
        default=None,
        metavar="NAME",
        help="model id(s) requests may name; the first is the one /v1/models and responses "
        "report (default: --model as given, or the built-in model's name)",
    )
    m.add_argument(
        "--dtype",
        default="auto",
        choices=DTYPE_CHOICES,
        help="weight and activation dtype; auto: the checkpoint's own (config.json's "
        "torch_dtype, float32 if it names none); half = float16, float = float32",
    )
    m.add_argument(
        "--cpu-compute-dtype",
        default="auto",
        choices=("auto", "bfloat16", "float32"),
        help="CPU: how bf16 linears of two or more rows (prefill, batched decode) compute; "
        "auto: in fp32 on bf16 weights widened on the fly (in registers for 2-55 rows, in "
        "cache-sized blocks from 56) where the CPU has no bf16 dot product (no AVX512-BF16 or "
        "AMX), else oneDNN's bf16; weights stay bf16 in memory either way",
    )
    m.add_argument(
        "--max-model-len",
        type=int,
        default=None,
        help="context length (prompt + completion) in tokens; default: the model's",
    )
    m.add_argument(
        "--generation-config",
        default="auto",
        metavar="auto|vllm|FOLDER",
        help="default sampling parameters (temperature, top_p, top_k, min_p, "
        "repetition_penalty) for requests that leave them out: 'auto' takes those the "
        "checkpoint's generation_config.json sets, FOLDER those of FOLDER/generation_config.json, "
        "'vllm' (or 'none') none, i.e. the OpenAI defaults",
    )
    m.add_argument(
        "--chat-template",
        default=None,
        help="chat template for /v1/chat/completions instead of the tokenizer's: a file "
        "(Jinja) or the template itself inline",
    )
    _switch(
        m,
        "--allow-pickle",
        "allow loading pickled (*.bin) weights from a local folder; unsafe for untrusted "
        "checkpoints, which can run arbitrary code when unpickled. Off: safetensors only "
        "(a hub --model never fetches pickles)",
    )
    _switch(
        m,
        "--trust-remote-code",
        "allow the checkpoint's own Python code (auto_map); off by default",
    )


def _engine_flags(e: argparse._ArgumentGroup) -> None:
    e.add_argument(
        "--tensor-parallel-size",
        "-tp",
        type=int,
        default=None,
        help="ranks per tensor-parallel group (default: every rank the launcher starts: "
        "deepspeed --num_gpus N / torchrun --nproc_per_node N, times the nodes). It must "
        "divide those ranks; W ranks at TP=T serve as W/T data-parallel replicas",
    )
    e.add_argument(
        "--data-parallel-size",
        "-dp",
        type=int,
        default=None,
        help="engine replicas (each a TP group of consecutive ranks, with its own KV cache "
        "and scheduler; global rank 0 routes requests to the least loaded). Optional: it "
        "follows from the ranks and --tensor-parallel-size; given, they must agree",
    )
    e.add_argument(
        "--seed",
        type=int,
        default=None,
        help="seed of the generator that draws a seed for every request that gives none, so "
        "a server run answers the same sequence of requests the same way (vLLM's --seed); "
        "default: unseeded requests are not reproducible",
    )
    e.add_argument(
        "--kv-cache-memory",
        type=float,
        default=None,
        help="KV-cache budget per rank in GiB (each rank holds only its KV heads). Default: "
        "on CUDA what --gpu-memory-utilization leaves after the weights and the largest "
        "step's activations; on CPU what --max-num-seqs sequences of --max-model-len tokens "
        "need, at most a quarter of the host's available memory shared by its local ranks",
    )
    e.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=0.9,
        help="CUDA: the share of each device's memory dstp may use in all (weights, "
        "activations and KV cache), as in vLLM; ignored with --kv-cache-memory or on CPU",
    )
    e.add_argument(
        "--num-kv-blocks",
        type=int,
        default=None,
        help="exact KV-cache blocks per rank, overriding --kv-cache-memory",
    )
    e.add_argument("--block-size", type=int, default=16, help="tokens per KV-cache block")
    e.add_argument(
        "--max-num-seqs", type=int, default=64, help="most sequences in one running batch"
    )
    e.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=2048,
        help="most tokens per engine step (long prompts are prefilled in chunks)",
    )
    e.add_argument(
        "--enable-prefix-caching",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="share KV blocks between requests with a common prompt prefix (default: on)",
    )
    _switch(
        e,
        "--no-prefix-caching",
        "disable sharing KV blocks between requests with a common prompt prefix "
        "(the same as --no-enable-prefix-caching)",
    )


def _http_flags(h: argparse._ArgumentGroup) -> None:
    h.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind; the default serves this machine only. Use 0.0.0.0 to "
        "listen on every interface (set --api-key then)",
    )
    h.add_argument("--port", type=int, default=8000, help="TCP port (0: any free port)")
    h.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer KEY' on every endpoint but /health "
        "(default: $DSTP_API_KEY, else no key)",
    )
    h.add_argument(
        "--max-queued-requests",
        type=int,
        default=256,
        help="admission limit: generation requests in flight at once (running or waiting "
        "for the engine); beyond it a request gets 429 + Retry-After at once. Each admitted "
        "request holds an HTTP thread until its answer is written, so this also sizes the "
        "thread pool (--http-threads)",
    )
    h.add_argument(
        "--max-body-bytes",
        type=int,
        default=4 * _MIB,
        help="largest request body; a larger one gets a JSON 413 once it has been read "
        f"(and dropped) to its end, up to {DRAIN_MAX_BYTES >> 20} MiB; beyond that the connection "
        "closes right after the 413 (request headers: 64 KiB at most, else 431)",
    )
    h.add_argument(
        "--http-threads",
        type=int,
        default=None,
        help=f"HTTP worker threads. Default: --max-queued-requests + {RESERVE_THREADS}, "
        "which lets the admission limit, not the threads, bound the work: every admitted "
        "request (streaming or not) holds one thread until its last byte is written, and "
        f"the {RESERVE_THREADS} spare ones answer rejections (429, 4xx) and quick requests. "
        f"A smaller value lowers the admission limit to it minus {RESERVE_THREADS} (with a "
        "warning) so that 429 still engages before the threads run out. GET /health, "
        f"/metrics and /v1/models have {FAST_THREADS} threads of their own and answer "
        "however busy generation is",
    )
    h.add_argument(
        "--request-read-timeout",
        type=float,
        default=REQUEST_READ_TIMEOUT_S,
        help="seconds a client may take to send one whole request (headers and body, from "
        "its first byte); a slower one is disconnected, so a client trickling bytes cannot "
        f"hold a connection. Also: an idle keep-alive connection closes after {IDLE_TIMEOUT_S} s, "
        f"and at most 2 x (HTTP threads + {FAST_THREADS}) connections (100 at least) are "
        "open at once; more wait to be accepted",
    )
    h.add_argument(
        "--enable-log-requests",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="log one line per request (id, tokens, latencies, finish reason, status)",
    )
    h.add_argument(
        "--disable-log-requests",
        dest="enable_log_requests",
        action="store_false",
        help="older vLLM spelling of --no-enable-log-requests (off is the default)",
    )


def _liveness_flags(r: argparse._ArgumentGroup) -> None:
    log_level = os.environ.get("DSTP_LOG_LEVEL", "INFO")  # the --log-level default
    r.add_argument(
        "--heartbeat-interval",
        type=float,
        default=1.0,
        help="seconds between no-op steps over every rank while idle (detects dead ranks)",
    )
    r.add_argument(
        "--rank-timeout",
        type=float,
        default=30.0,
        help="seconds a heartbeat may take before a rank counts as hung and the server exits",
    )
    r.add_argument(
        "--step-timeout",
        type=float,
        default=600.0,
        help="seconds one engine step may take before a rank counts as hung",
    )
    r.add_argument(
        "--log-level",
        default=log_level,
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="log verbosity",
    )
    r.add_argument(
        "--local_rank",
        "--local-rank",
        type=int,
        default=None,
        help="set by the deepspeed launcher; ignored (the rank comes from the environment)",
    )


def _switch(group: argparse._ArgumentGroup, flag: str, help: str) -> None:
    """An on/off flag, off by default."""
    group.add_argument(flag, action="store_true", help=help)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="launch/serve.py",
        description=USAGE.split("\n\n")[0],
        epilog=USAGE.split("\n\n", 1)[1],
    )
    add_arguments(parser)
    return parser


def size_http_pool(args: argparse.Namespace, warn: bool) -> bool:
    """Derive --http-threads from the admission limit, or the limit from explicit threads."""
    if args.max_queued_requests < 1:
        log.error("--max-queued-requests must be at least 1")
        return False
    if args.http_threads is None:
        args.http_threads = http_threads(args.max_queued_requests)
        return True
    room = args.http_threads - RESERVE_THREADS
    if room < 1:
        log.error("--http-threads must be at least %d", RESERVE_THREADS + 1)
        return False
    if args.max_queued_requests > room:
        if warn:
            log.warning(
                "--http-threads %d leaves threads for %d admitted requests (%d are spare): "
                "lowering --max-queued-requests from %d to %d so that 429 engages first",
                args.http_threads,
                room,
                RESERVE_THREADS,
                args.max_queued_requests,
                room,
            )
        args.max_queued_requests = room
    return True


class FlagError(ValueError):
    """A flag's value cannot be used; the message (one line) says why."""


def prefix_caching_enabled(args: argparse.Namespace) -> bool:
    """``--[no-]enable-prefix-caching`` (vLLM) or ``--no-prefix-caching`` (dstp); on by default."""
    if args.enable_prefix_caching is None:
        return not args.no_prefix_caching
    if args.enable_prefix_caching and args.no_prefix_caching:
        raise FlagError("--enable-prefix-caching and --no-prefix-caching contradict each other")
    return args.enable_prefix_caching


def load_chat_template(value: str | None) -> str | None:
    """``--chat-template``: a file's text, or the template given inline (vLLM's rule: a value
    that is no file but holds one of ``{}`` or a newline is a template)."""
    if value is None:
        return None
    path = os.path.expanduser(value)
    if os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as handle:
                return handle.read()
        except (OSError, UnicodeDecodeError) as exc:
            raise FlagError(f"--chat-template: cannot read {value}: {exc}") from None
    if any(c in value for c in "{}\n"):
        if "\\n" in value and value.isascii():  # written on one line, as vLLM's docs do
            return value.encode().decode("unicode_escape")
        return value
    raise FlagError(
        f"--chat-template {value!r} is neither a file nor a Jinja template (no such file; a "
        "template inline holds {{ ... }} or {% ... %})"
    )


def check_tp_size(args: argparse.Namespace, world_size: int) -> None:
    """``--tensor-parallel-size`` (and ``--data-parallel-size``) against the ranks the
    launcher started: :class:`~dstp.replicas.ReplicaLayout` owns the rule and its message."""
    from dstp.replicas import ReplicaLayout

    dp = args.data_parallel_size
    try:
        layout = ReplicaLayout.resolve(world_size, args.tensor_parallel_size, dp)
    except ValueError as exc:
        raise FlagError(str(exc)) from None
    if dp is not None:
        args.tensor_parallel_size = layout.tp


# dest -> (flag, lowest allowed, what the flag is for); an omitted (None) optional flag passes
_AT_LEAST = {
    "max_num_seqs": ("--max-num-seqs", 1, "sequences per batch; 0 would schedule nothing"),
    "max_num_batched_tokens": (
        "--max-num-batched-tokens", 1, "tokens per engine step; 0 would schedule nothing",
    ),
    "block_size": ("--block-size", 1, "tokens per KV-cache block"),
    "num_kv_blocks": ("--num-kv-blocks", 1, "KV-cache blocks per rank"),
    "max_model_len": ("--max-model-len", 2, "a prompt token and a completion token at least"),
    "max_body_bytes": ("--max-body-bytes", 1, "the largest request body"),
    "port": ("--port", 0, "0 picks a free port"),
}  # fmt: skip
# dest -> flag of the settings that must be positive numbers of seconds or GiB
_POSITIVE = {
    "kv_cache_memory": "--kv-cache-memory",
    "heartbeat_interval": "--heartbeat-interval",
    "rank_timeout": "--rank-timeout",
    "step_timeout": "--step-timeout",
    "request_read_timeout": "--request-read-timeout",
}


def check_ranges(args: argparse.Namespace) -> None:
    """Numbers the engine or server cannot run with: refused at start-up, naming the fix,
    instead of a crash or clients that hang later."""
    values = vars(args)
    for dest, (flag, lowest, meaning) in _AT_LEAST.items():
        value = values[dest]
        if value is not None and value < lowest:
            raise FlagError(
                f"{flag} {value} is too small ({meaning}): pass {lowest} or more, or leave "
                "it out for the default"
            )
    if args.port > 65535:
        raise FlagError(f"--port {args.port} is not a TCP port: pass 0-65535 (0: any free port)")
    for dest, flag in _POSITIVE.items():
        value = values[dest]
        if value is not None and not value > 0:
            raise FlagError(f"{flag} {value} must be above 0: pass a positive number")
    util = args.gpu_memory_utilization
    if not 0 < util <= 1:
        raise FlagError(
            f"--gpu-memory-utilization {util} is outside (0, 1]: it is the share of each "
            "device's memory dstp may use; pass e.g. 0.9 (the default) for 90 %"
        )


def check_args(args: argparse.Namespace, world_size: int) -> None:
    """Every check that needs no model, run by every rank before anything starts; fills in
    ``args.chat_template_text`` and ``args.prefix_caching``. Raises :class:`FlagError`."""
    check_tp_size(args, world_size)
    check_ranges(args)
    args.prefix_caching = prefix_caching_enabled(args)
    args.chat_template_text = load_chat_template(args.chat_template)
    if args.seed is not None and not 0 <= args.seed < 2**63:
        raise FlagError(f"--seed must be in [0, 2**63), got {args.seed}")
    gen = args.generation_config
    if gen not in ("auto", "vllm", "none") and not os.path.isdir(os.path.expanduser(gen)):
        raise FlagError(
            f"--generation-config {gen!r}: expected 'auto', 'vllm' or a folder holding "
            "generation_config.json"
        )


ALLOW_LONG_ENV = "DSTP_ALLOW_LONG_MAX_MODEL_LEN"  # vLLM's VLLM_ALLOW_LONG_MAX_MODEL_LEN


def check_model_args(
    args: argparse.Namespace, model_config, generation_eos: int | list[int] | None = None
) -> None:
    """The checks that need the checkpoint's config (a transformers ``PretrainedConfig``;
    ``generation_eos``: generation_config.json's eos_token_id): ``--max-model-len`` within
    its trained context, and its EOS ids inside its vocabulary."""
    text = model_config.get_text_config()
    trained = getattr(text, "max_position_embeddings", None)
    wanted = args.max_model_len
    if trained is not None and wanted is not None and wanted > trained:
        if os.environ.get(ALLOW_LONG_ENV, "0") not in ("", "0"):
            log.warning(
                "--max-model-len %d exceeds the model's max_position_embeddings %d (allowed by "
                "%s): outputs past the trained context may be wrong",
                wanted, trained, ALLOW_LONG_ENV,
            )  # fmt: skip
        else:
            raise FlagError(
                f"--max-model-len {wanted} exceeds the model's max_position_embeddings "
                f"{trained} (config.json): pass --max-model-len {trained} or less, or leave "
                f"it out; to serve longer anyway, set {ALLOW_LONG_ENV}=1"
            )
    vocab = getattr(text, "vocab_size", None)  # a transformers config: fields vary by model
    for file, eos in (
        ("config.json", getattr(text, "eos_token_id", None)),
        ("generation_config.json", generation_eos),
    ):
        eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
        outside = [e for e in eos_ids if vocab is not None and not 0 <= e < vocab]
        if outside:
            raise FlagError(
                f"--model: eos_token_id {outside} in {file} is outside the model's vocabulary "
                f"[0, {vocab}): correct it in the checkpoint's {file}"
            )
