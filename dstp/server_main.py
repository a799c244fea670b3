"""``dstp serve`` / ``launch/serve.py``: start the engine on every rank, HTTP on rank 0.

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

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import sys
import threading
import time

log = logging.getLogger("dstp")

_MIB = 1024 * 1024
# dstp.server's numbers (tests check they agree); importing it would load Flask on every rank
_RESERVE_THREADS, _FAST_THREADS, _IDLE_S, _DRAIN_MAX_MIB = 16, 4, 30, 256


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
    m = parser.add_argument_group("model")
    m.add_argument(
        "--model",
        default=None,
        help="Hugging Face checkpoint folder (config.json, *.safetensors, tokenizer). "
        "Omitted: a small RANDOMLY INITIALISED Llama is generated once under "
        "~/.cache/dstp/ and served, for trying the server (its output is gibberish)",
    )
    m.add_argument(
        "--served-model-name",
        default=None,
        help="model id reported by /v1/models and accepted in requests "
        "(default: the checkpoint folder's name)",
    )
    m.add_argument(
        "--dtype",
        default="bfloat16",
        choices=["bfloat16", "float16", "float32"],
        help="weight and activation dtype",
    )
    m.add_argument(
        "--max-model-len",
        type=int,
        default=None,
        help="context length (prompt + completion) in tokens; default: the model's",
    )
    m.add_argument(
        "--allow-pickle",
        action="store_true",
        help="allow loading pickled (*.bin) weights; unsafe for untrusted checkpoints, "
        "which can run arbitrary code when unpickled. Off: safetensors only",
    )
    m.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow the checkpoint's own Python code (auto_map); off by default",
    )

    e = parser.add_argument_group("engine")
    e.add_argument(
        "--kv-cache-memory",
        type=float,
        default=1.0,
        help="KV-cache budget per rank in GiB (each rank holds only its KV heads)",
    )
    e.add_argument(
        "--num-kv-blocks",
        type=int,
        default=None,
        help="exact KV-cache blocks per rank, overriding --kv-cache-memory",
    )
    e.add_argument("--block-size", type=int, default=16, help="tokens per KV-cache block")
    e.add_argument(
        "--max-num-seqs",
        type=int,
        default=64,
        help="most sequences in one running batch",
    )
    e.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=2048,
        help="most tokens per engine step (long prompts are prefilled in chunks)",
    )
    e.add_argument(
        "--no-prefix-caching",
        action="store_true",
        help="disable sharing KV blocks between requests with a common prompt prefix",
    )

    h = parser.add_argument_group("HTTP")
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
        f"(and dropped) to its end, up to {_DRAIN_MAX_MIB} MiB; beyond that the connection "
        "closes right after the 413 (request headers: 64 KiB at most, else 431)",
    )
    h.add_argument(
        "--http-threads",
        type=int,
        default=None,
        help=f"HTTP worker threads. Default: --max-queued-requests + {_RESERVE_THREADS}, "
        "which lets the admission limit, not the threads, bound the work: every admitted "
        "request (streaming or not) holds one thread until its last byte is written, and "
        f"the {_RESERVE_THREADS} spare ones answer rejections (429, 4xx) and quick requests. "
        f"A smaller value lowers the admission limit to it minus {_RESERVE_THREADS} (with a "
        "warning) so that 429 still engages before the threads run out. GET /health, "
        f"/metrics and /v1/models have {_FAST_THREADS} threads of their own and answer "
        "however busy generation is",
    )
    h.add_argument(
        "--request-read-timeout",
        type=float,
        default=30.0,
        help="seconds a client may take to send one whole request (headers and body, from "
        "its first byte); a slower one is disconnected, so a client trickling bytes cannot "
        f"hold a connection. Also: an idle keep-alive connection closes after {_IDLE_S} s, "
        f"and at most 2 x (HTTP threads + {_FAST_THREADS}) connections (100 at least) are "
        "open at once; more wait to be accepted",
    )

    r = parser.add_argument_group("liveness")
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
        default=os.environ.get("DSTP_LOG_LEVEL", "INFO"),
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="launch/serve.py",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
    )
    add_arguments(parser)
    return parser


def _setup_logging(level: str, rank: int) -> None:
    fmt = f"%(asctime)s [dstp rank{rank}] %(levelname)s %(message)s"
    logging.basicConfig(level=getattr(logging, level), format=fmt, stream=sys.stderr, force=True)
    logging.getLogger("dstp").setLevel(getattr(logging, level))
    for noisy in ("DeepSpeed", "urllib3", "waitress.queue"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _engine_config(args: argparse.Namespace, model: str):
    """EngineConfig from the flags, passing only the fields this engine version has."""
    from .engine import EngineConfig

    wanted = {
        "model": model,
        "dtype": args.dtype,
        "kv_cache_memory_gib": args.kv_cache_memory,
        "block_size": args.block_size,
        "max_num_seqs": args.max_num_seqs,
        "max_num_batched_tokens": args.max_num_batched_tokens,
        "max_model_len": args.max_model_len,
        "enable_prefix_caching": not args.no_prefix_caching,
        "allow_pickle": args.allow_pickle,
        "trust_remote_code": args.trust_remote_code,
        "model_name": args.served_model_name,
        "num_blocks": args.num_kv_blocks,
    }
    fields = {f.name for f in dataclasses.fields(EngineConfig)}
    missing = sorted(k for k in set(wanted) - fields if wanted[k] is not None)
    if missing:
        log.warning("this engine has no setting for: %s (ignored)", ", ".join(missing))
    return EngineConfig(**{k: v for k, v in wanted.items() if k in fields})


def main(args: argparse.Namespace) -> int:
    """Serve until stopped, then leave the process group together and exit with the code."""
    from .distributed import shutdown

    shutdown(exit_code=_run(args))
    return 1  # not reached: shutdown exits


def _run(args: argparse.Namespace) -> int:
    rank = int(os.environ.get("RANK", "0"))
    _setup_logging(args.log_level, rank)
    if not _size_http_pool(args, warn=rank == 0):
        return 1
    if rank != 0:
        # Rank 0 coordinates a stop: it fails in-flight requests, then releases
        # us through the engine. Launchers signal every rank at once, and a
        # follower that died right away would strand rank 0 mid-collective
        # (a shared-memory all-reduce waits forever), so its clients would get a
        # cut stream instead of an error. Wait to be released; exit regardless
        # after a grace period (rank 0 may be gone too).
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, _follower_sigterm)

    from .default_model import DEFAULT_MODEL_ID, ensure_default_model

    random_model = args.model is None
    model = str(ensure_default_model()) if random_model else args.model
    if random_model:
        log.warning(
            "no --model given: serving '%s', a RANDOMLY INITIALISED Llama (%s); "
            "its output is meaningless",
            DEFAULT_MODEL_ID,
            model,
        )

    lazy = server = None
    if rank == 0:
        from .server import LazyApp, connection_limit, make_wsgi_server

        lazy = LazyApp()
        _raise_fd_limit(connection_limit(args.http_threads) + 256)
        try:  # bind before loading: a taken port fails in seconds, not after the load
            server = make_wsgi_server(
                lazy,
                args.host,
                args.port,
                args.http_threads,
                args.max_body_bytes,
                request_read_timeout_s=args.request_read_timeout,
            )
        except OSError as exc:
            log.error("cannot listen on %s:%s: %s", args.host, args.port, exc)
            return 1

    try:
        from .engine import Engine

        engine = Engine(_engine_config(args, model))
    except Exception:
        log.exception("engine start-up failed")
        return 1

    if not engine.tp.is_driver:
        log.info("rank %d/%d ready: following rank 0", engine.tp.rank, engine.tp.size)
        try:
            engine.run_follower()
        except Exception as exc:
            log.error(
                "rank %d: the group broke (rank 0 or another rank died): %s", engine.tp.rank, exc
            )
            return 1
        log.info("rank %d: released by rank 0, exiting", engine.tp.rank)
        return 0
    return _serve(args, engine, server, lazy, model, random_model)


def _serve(args, engine, server, lazy, model: str, random_model: bool) -> int:
    from .async_engine import EngineDriver, EngineUnavailable
    from .default_model import DEFAULT_MODEL_ID
    from .server import ServerConfig, create_app
    from .tokenizer import load_tokenizer

    stop = threading.Event()
    fatal: list[BaseException] = []

    def on_fatal(exc: BaseException) -> None:
        fatal.append(exc)
        stop.set()

    driver = EngineDriver(
        engine,
        max_queued_requests=args.max_queued_requests,
        heartbeat_interval_s=args.heartbeat_interval,
        heartbeat_timeout_s=args.rank_timeout,
        step_timeout_s=args.step_timeout,
        on_fatal=on_fatal,
    )
    try:
        driver.start(ready_timeout_s=max(60.0, args.rank_timeout))
    except EngineUnavailable as exc:
        log.error("%s", exc)
        os._exit(1)  # a rank is gone: skip the exit-time barrier that would wait for it

    name = args.served_model_name or (
        DEFAULT_MODEL_ID if random_model else getattr(engine, "model_name", None) or model
    )
    tokenizer = load_tokenizer(model, args.trust_remote_code)  # the HTTP threads' own copy
    config = ServerConfig(
        model_name=name,
        max_model_len=engine.max_model_len,
        vocab_size=engine.vocab_size,
        api_key=args.api_key or os.environ.get("DSTP_API_KEY") or None,
        max_body_bytes=args.max_body_bytes,
        model_aliases=tuple({model, getattr(engine, "model_name", model)} - {name}),
        model_description=(
            "RANDOMLY INITIALISED weights generated by dstp: output is meaningless"
            if random_model
            else None
        ),
        tp_size=engine.tp.size,
    )
    lazy.app = create_app(driver, tokenizer, config)

    def on_signal(signum, _frame):
        if stop.is_set():
            log.warning("%s while stopping: exiting now", signal.Signals(signum).name)
            os._exit(1)
        log.info("%s received: stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    host, port = server.effective_host, server.effective_port
    log.info(
        "serving '%s' on http://%s:%s (TP=%d, max_model_len=%d, API key %s) "
        "endpoints: /v1/completions /v1/chat/completions /v1/models /generate /health /metrics",
        name,
        host,
        port,
        engine.tp.size,
        engine.max_model_len,
        "required" if config.api_key else "off",
    )
    if args.host not in ("127.0.0.1", "localhost", "::1") and not config.api_key:
        log.warning("listening on %s without --api-key: anyone who can reach it may use it", host)

    _pump(server, stop)  # until a signal or a fatal engine error
    code = _shut_down(server, driver, lazy, fatal)
    if code != 0:
        logging.shutdown()
        os._exit(code)  # peers are gone: an exit-time barrier would only wait for them
    return code


def _size_http_pool(args: argparse.Namespace, warn: bool) -> bool:
    """Derive --http-threads from the admission limit, or the limit from explicit threads."""
    if args.max_queued_requests < 1:
        log.error("--max-queued-requests must be at least 1")
        return False
    if args.http_threads is None:
        args.http_threads = args.max_queued_requests + _RESERVE_THREADS  # server.http_threads
        return True
    room = args.http_threads - _RESERVE_THREADS
    if room < 1:
        log.error("--http-threads must be at least %d", _RESERVE_THREADS + 1)
        return False
    if args.max_queued_requests > room:
        if warn:
            log.warning(
                "--http-threads %d leaves threads for %d admitted requests (%d are spare): "
                "lowering --max-queued-requests from %d to %d so that 429 engages first",
                args.http_threads,
                room,
                _RESERVE_THREADS,
                args.max_queued_requests,
                room,
            )
        args.max_queued_requests = room
    return True


def _raise_fd_limit(needed: int) -> None:
    """Every open connection is a file descriptor: lift a low soft limit (often 1024)."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft == resource.RLIM_INFINITY or soft >= needed:
            return
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        if target < needed:
            log.warning("open-file limit %d is below the %d connections may need", target, needed)
    except (ImportError, OSError, ValueError) as exc:
        log.warning("could not raise the open-file limit: %s", exc)


FOLLOWER_GRACE_S = 20.0


def _follower_sigterm(signum: int, _frame: object) -> None:
    log.info("SIGTERM: waiting up to %.0f s for rank 0 to release this rank", FOLLOWER_GRACE_S)
    timer = threading.Timer(FOLLOWER_GRACE_S, os._exit, args=(1,))
    timer.daemon = True
    timer.start()


def _pump(server, stop: threading.Event) -> None:
    """Run waitress's event loop in slices so a stop request is seen within ~0.2 s."""
    from .server import pump_once

    while not stop.is_set():
        pump_once(server)


def _shut_down(server, driver, lazy, fatal: list[BaseException]) -> int:
    """Fail in-flight requests, keep the loop running until their errors are written."""
    from .server import pump_once

    stopper = threading.Thread(
        target=driver.stop,
        kwargs={"reason": "server shutting down" if not fatal else "engine failed"},
        daemon=True,
    )
    stopper.start()
    deadline = time.monotonic() + 15.0
    while (stopper.is_alive() or lazy.active > 0) and time.monotonic() < deadline:
        pump_once(server, 0.1)
    for _ in range(5):  # flush what the last responses wrote
        pump_once(server, 0.05)
    server.close()
    if fatal:
        log.error("exiting with an error: %r", fatal[0])
        return 1
    if stopper.is_alive():
        log.error("engine did not stop in time")
        return 1
    log.info("stopped")
    return 0
