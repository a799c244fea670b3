"""``dstp serve``'s flags, shared with ``launch/serve.py``. Light on purpose: every rank
parses them, and only rank 0 loads the HTTP server.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex

from dstp.engine.config import DTYPE_CHOICES, context_length
from dstp.server.limits import (
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

Global rank 0 serves HTTP. SIGTERM or Ctrl-C on rank 0 stops every rank, failing
in-flight requests with an error; if a rank dies, the job exits non-zero instead
of hanging. Or run it supervised, with no launcher::

    dstp serve --model PATH --tensor-parallel-size 2

a front-end that serves HTTP, starts the ranks under deepspeed itself, and when one
dies restarts them and replays every request. docs/serving.md explains every flag.
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
    model, engine = parser.add_argument_group("model"), parser.add_argument_group("engine")
    _model_flags(model)
    _model_use_flags(model)
    _engine_flags(engine)
    _scheduler_flags(engine)
    _http_flags(parser.add_argument_group("HTTP"))
    _chat_flags(parser.add_argument_group("tools and reasoning"))
    _liveness_flags(parser.add_argument_group("liveness"))
    _supervision_flags(parser.add_argument_group("supervised mode (no launcher)"))


def _chat_flags(c: argparse._ArgumentGroup) -> None:
    from dstp.server.reasoning import REASONING_PARSERS
    from dstp.server.tool_calls import PARSERS

    c.add_argument(
        "--tool-call-parser",
        choices=sorted(PARSERS),
        help="the model family's tool-call format: parses calls out of answers, and shapes "
        "calls forced by tool_choice (default for those: hermes)",
    )
    c.add_argument(
        "--enable-auto-tool-choice",
        action="store_true",
        help='let the model decide when to call tools (tool_choice "auto"); needs '
        "--tool-call-parser",
    )
    c.add_argument(
        "--reasoning-parser",
        choices=sorted(REASONING_PARSERS),
        help="split the model's thinking into reasoning_content (deepseek_r1, qwen3)",
    )


def _model_flags(m: argparse._ArgumentGroup) -> None:
    m.add_argument(
        "--model",
        help="the model to serve: a checkpoint folder or a Hugging Face hub id (fetched once "
        "if not cached). Omitted: the built-in stories260K, a tiny Llama that writes "
        "children's stories; 'random': a small random Llama (gibberish, for benchmarks)",
    )
    m.add_argument(
        "--revision",
        help="branch, tag or commit of a hub --model (default: main)",
    )
    m.add_argument(
        "--download-dir",
        help="Hugging Face cache folder to find and fetch a hub --model in "
        "(default: $HF_HUB_CACHE, else ~/.cache/huggingface/hub)",
    )
    m.add_argument(
        "--served-model-name",
        nargs="+",
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
        help="CPU: the precision bf16 matrix products of prefill and batched decode compute "
        "in; auto picks the faster on this CPU (docs/serving.md says how)",
    )


def _model_use_flags(m: argparse._ArgumentGroup) -> None:
    m.add_argument(
        "--max-model-len",
        type=int,
        help="context length (prompt + completion) in tokens; default: the model's",
    )
    m.add_argument(
        "--generation-config",
        default="auto",
        metavar="auto|vllm|FOLDER",
        help="where requests' default temperature, top_p, top_k, min_p and "
        "repetition_penalty come from: the checkpoint's generation_config.json (auto), "
        "FOLDER's, or none, i.e. OpenAI's (vllm)",
    )
    m.add_argument(
        "--chat-template",
        help="chat template for /v1/chat/completions instead of the tokenizer's: a file "
        "(Jinja) or the template itself inline",
    )
    m.add_argument(
        "--policy",
        metavar="FILE_OR_MODULE",
        help="your own injection policy: a .py file or a module's dotted name that calls "
        "dstp.policies.register(policy) on import; imported on every rank before the model "
        "is built, it wins over the built-in and derived policies for the architectures it "
        "names (docs/writing-a-policy.md)",
    )
    _switch(
        m,
        "--allow-pickle",
        "allow pickled (*.bin) weights from a local folder; unsafe: an untrusted pickle can "
        "run code. Off: safetensors only",
    )
    _switch(
        m,
        "--trust-remote-code",
        "allow the checkpoint's own Python code (auto_map); off by default",
    )
    _switch(
        m,
        "--no-fused-layers",
        "run Hugging Face's own decoder layers instead of the policy's fused ones (one GEMM "
        "for q/k/v and one for gate/up, fewer ops a step; each is proven equal to HF's "
        "layer at load, which keeps HF's wherever it is not)",
    )


def _engine_flags(e: argparse._ArgumentGroup) -> None:
    e.add_argument(
        "--tensor-parallel-size",
        "-tp",
        type=int,
        help="ranks that split one copy of the model (default: every rank the launcher "
        "starts); it must divide them, and W ranks at TP=T serve W/T replicas",
    )
    e.add_argument(
        "--data-parallel-size",
        "-dp",
        type=int,
        help="copies of the model behind one endpoint, requests going to the least loaded "
        "(default: the ranks / --tensor-parallel-size)",
    )
    e.add_argument(
        "--seed",
        type=int,
        help="makes a server run answer the same sequence of requests the same way (requests "
        "without a seed get one drawn from it); default: unseeded requests vary",
    )
    e.add_argument(
        "--kv-cache-memory",
        type=float,
        help="KV-cache memory per rank in GiB (default: sized from the device's free memory; "
        "docs/serving.md says how)",
    )
    e.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=0.9,
        help="CUDA: the share of each device's memory dstp may use in all, in (0, 1]; ignored "
        "with --kv-cache-memory or on CPU",
    )
    e.add_argument(
        "--num-kv-blocks",
        type=int,
        help="exact KV-cache blocks per rank, overriding --kv-cache-memory",
    )


def _scheduler_flags(e: argparse._ArgumentGroup) -> None:
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
        default=None,  # None: not given (prefix_caching_enabled)
        help="share KV blocks between requests with a common prompt prefix (default: on)",
    )
    _switch(
        e,
        "--no-prefix-caching",
        "disable sharing KV blocks between requests with a common prompt prefix "
        "(the same as --no-enable-prefix-caching)",
    )
    _switch(
        e,
        "--compile-decode",
        "run decode-only steps at padded batch sizes (1, 2, 4, 8, 16, 24, ... up to "
        "--max-num-seqs) over inputs allocated once, each size's forward traced whole by "
        "torch.compile (fullgraph, static shapes): the fixed-shape step a CUDA graph "
        "captures. Every size compiles at start-up. TP=1; at TP>1 the padded steps "
        "run uncompiled",
    )
    graphs = e.add_mutually_exclusive_group()
    graphs.add_argument(
        "--cuda-graphs",
        dest="cuda_graphs",
        action="store_const",
        const=True,
        default=None,
        help="capture each padded decode shape (the batch sizes --compile-decode lists, by "
        "block-table widths of 16, 32, 64, ... blocks) as a CUDA graph at start-up and "
        "replay it at every decode-only step: one launch per step instead of one per kernel. "
        "On by default where graphs run (CUDA, TP=1); this flag also captures at TP>1 over "
        "NCCL (not yet run on a multi-GPU machine) and warns where graphs cannot run",
    )
    graphs.add_argument(
        "--enforce-eager",
        dest="cuda_graphs",
        action="store_const",
        const=False,
        help="no CUDA graphs: every step launches its kernels one by one (vLLM's flag)",
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
        help="require 'Authorization: Bearer KEY' on every endpoint but /health "
        "(default: $DSTP_API_KEY, else no key)",
    )
    h.add_argument(
        "--max-queued-requests",
        type=int,
        default=256,
        help="generation requests in flight at once (running or waiting); beyond it a "
        "request gets 429 with Retry-After at once",
    )
    h.add_argument(
        "--max-body-bytes",
        type=int,
        default=4 * _MIB,
        help="largest request body in bytes; a larger one gets 413",
    )
    h.add_argument(
        "--http-threads",
        type=int,
        help=f"HTTP worker threads (default: --max-queued-requests + {RESERVE_THREADS}); fewer "
        f"lower the admission limit to them minus {RESERVE_THREADS}",
    )
    h.add_argument(
        "--request-read-timeout",
        type=float,
        default=REQUEST_READ_TIMEOUT_S,
        help="seconds a client may take to send one whole request; a slower one is disconnected",
    )
    h.add_argument(
        "--enable-log-requests",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="log one line per request (id, tokens, latencies, finish reason, status)",
    )
    h.add_argument(
        "--max-log-len",
        type=int,
        help="with --enable-log-requests: most prompt characters and token ids logged "
        "(default: all)",
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
        help="seconds one engine step may take before a rank counts as hung; once serving, "
        "also the longest any rank waits in a collective",
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
        help="set by the deepspeed launcher; ignored (the rank comes from the environment)",
    )


def _supervision_flags(s: argparse._ArgumentGroup) -> None:
    s.add_argument(
        "--supervise",
        action="store_true",
        help="run outside a launcher as a front-end that starts the ranks itself and replays "
        "requests when one dies (the default when --tensor-parallel-size is above 1)",
    )
    s.add_argument(
        "--max-restarts",
        type=int,
        default=3,
        help="engine-job restarts a supervised server makes before it gives up and exits non-zero",
    )
    s.add_argument(
        "--launcher-args",
        default="",
        help='options for the deepspeed launcher a supervised server runs, e.g. "--hostfile '
        'hosts --include worker-1:0,1"',
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


def load_policy_flag(value: str | None) -> tuple:
    """``--policy``: import the file or module; the policies it registered (none without the
    flag). The one dstp picks for the model is checked once its config is read
    (:func:`check_policy_choice`)."""
    if value is None:
        return ()
    from dstp.model.policy_source import PolicySourceError, import_policies

    try:
        return import_policies(value)
    except PolicySourceError as exc:
        raise FlagError(str(exc)) from None


def check_policy_choice(args: argparse.Namespace, model_config):
    """The policy dstp will use, when ``--policy`` is given: one the flag registered (else
    :class:`FlagError`); None without the flag."""
    if not args.policy:
        return None
    from dstp.model.policy_source import PolicySourceError, chosen_policy

    try:
        return chosen_policy(model_config, args.policies, args.policy)
    except PolicySourceError as exc:
        raise FlagError(str(exc)) from None


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
    "max_restarts": ("--max-restarts", 0, "engine-job restarts; 0 never restarts"),
}  # fmt: skip
# dest -> flag of the settings that must be positive numbers of seconds or GiB
_POSITIVE = {
    "kv_cache_memory": "--kv-cache-memory",
    "heartbeat_interval": "--heartbeat-interval",
    "rank_timeout": "--rank-timeout",
    "step_timeout": "--step-timeout",
    "request_read_timeout": "--request-read-timeout",
    "max_log_len": "--max-log-len",
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
    check_launcher_args(args.launcher_args)


def check_launcher_args(text: str) -> None:
    """``--launcher-args`` must split into shell words and name a usable ``--master_port``
    (the supervised front-end reads it; a bad one would fail only when the job starts)."""
    from dstp.frontend.job import chosen_master_port

    try:
        words = shlex.split(text)
    except ValueError as exc:
        raise FlagError(
            f"--launcher-args {text!r} does not split into shell words ({exc}): balance its quotes"
        ) from None
    try:
        port = chosen_master_port(words)
    except ValueError:
        port = -1
    if port is not None and not 1 <= port <= 65535:
        raise FlagError(
            f"--launcher-args {text!r} names a --master_port that is not a TCP port: pass "
            "1-65535, or leave it out for a free port drawn at each start"
        )


def check_args(args: argparse.Namespace, world_size: int) -> None:
    """Every check that needs no model, run by every rank before anything starts; fills in
    ``args.chat_template_text``, ``args.prefix_caching`` and ``args.policies`` (importing
    ``--policy``). Raises :class:`FlagError`."""
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
    args.policies = load_policy_flag(args.policy)
    if args.enable_auto_tool_choice and not args.tool_call_parser:
        raise FlagError(
            "--enable-auto-tool-choice needs --tool-call-parser to read the calls: pass one of "
            "hermes, llama3_json, mistral, pythonic"
        )


def check_model_args(
    args: argparse.Namespace, model_config, generation_eos: int | list[int] | None = None
) -> None:
    """The checks that need the checkpoint's config (a transformers ``PretrainedConfig``;
    ``generation_eos``: generation_config.json's eos_token_id): ``--max-model-len`` within
    its trained context, and its EOS ids inside its vocabulary."""
    text = model_config.get_text_config()
    try:
        context_length(args.max_model_len, getattr(text, "max_position_embeddings", None))
    except ValueError as exc:
        raise FlagError(str(exc)) from None
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
