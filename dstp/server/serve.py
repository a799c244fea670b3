"""``dstp serve``: the engine on every rank, HTTP on global rank 0, and stopping together.

A rank that stops alone would leave the others hanging in a collective, so rank 0 decides
every stop (a signal, or a rank found dead) and releases or outlives the rest.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from typing import TYPE_CHECKING

from dstp.frontend import supervised, under_frontend
from dstp.server.cli import (
    FlagError,
    add_arguments,
    build_parser,
    check_args,
    check_model_args,
    check_policy_choice,
    size_http_pool,
)
from dstp.server.limits import connection_limit
from dstp.server.tool_use import ToolSettings

if TYPE_CHECKING:
    from dstp.model.default_model import BuiltinModel

__all__ = ["add_arguments", "build_parser", "main"]

log = logging.getLogger("dstp")


def _setup_logging(level: str, role: str) -> None:
    fmt = f"%(asctime)s [dstp {role}] %(levelname)s %(message)s"
    logging.basicConfig(level=getattr(logging, level), format=fmt, stream=sys.stderr, force=True)
    logging.getLogger("dstp").setLevel(getattr(logging, level))
    for noisy in ("DeepSpeed", "urllib3", "waitress.queue"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _engine_config(args: argparse.Namespace, model: str, name: str | None = None):
    """EngineConfig from the flags (``check_args`` has run)."""
    from dstp.distributed import init_tp
    from dstp.engine.config import EngineConfig, describe_dtype, resolve_dtype

    device_type = init_tp(args.tensor_parallel_size).device.type
    dtype = resolve_dtype(args.dtype, model, device_type)
    if args.dtype != dtype:
        log.info("%s", describe_dtype(args.dtype, model, device_type))
    return EngineConfig(
        model=model,
        dtype=dtype,
        cpu_compute_dtype=args.cpu_compute_dtype,
        kv_cache_memory_gib=args.kv_cache_memory,
        gpu_memory_utilization=args.gpu_memory_utilization,
        block_size=args.block_size,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len,
        enable_prefix_caching=args.prefix_caching,
        allow_pickle=args.allow_pickle,
        trust_remote_code=args.trust_remote_code,
        fused_layers=not args.no_fused_layers,
        model_name=name,
        num_blocks=args.num_kv_blocks,
        tensor_parallel_size=args.tensor_parallel_size,
        compile_decode="eager" if args.compile_decode else None,
        cuda_graphs=args.cuda_graphs,
    )


def main(args: argparse.Namespace) -> int:
    """Serve until stopped, then leave the process group together and exit with the code."""
    from dstp.distributed import shutdown

    shutdown(exit_code=_run(args))
    return 1  # not reached: shutdown exits


def _run(args: argparse.Namespace) -> int:
    rank = int(os.environ.get("RANK", "0"))
    if supervised(args):  # no launcher: a front-end that starts the ranks itself
        _setup_logging(args.log_level, "front-end")
        return _run_frontend(args)
    _setup_logging(args.log_level, f"rank{rank}")
    if not _flags_ok(args, rank):
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

    from dstp.model.default_model import resolve_model

    model, builtin = resolve_model(args.model)
    if builtin is not None:
        log.warning(
            "serving the built-in '%s' (%s): %s", builtin.model_id, model, builtin.description
        )
    lazy = server = None
    if rank == 0 and not under_frontend():
        from dstp.server.wsgi import LazyApp

        lazy = LazyApp()
        server = _bind(args, lazy)  # before loading: a taken port fails in seconds
        if server is None:
            return 1
    started = _start_engine(args, model, builtin)
    if started is None:
        return 1
    engine, link, model = started
    return _run_role(args, engine, link, server, lazy, model, builtin)


def _run_frontend(args: argparse.Namespace) -> int:
    """Supervised mode: this process serves HTTP; an engine job it starts runs the ranks."""
    from dstp.frontend.serve import run_frontend

    args.tensor_parallel_size = args.tensor_parallel_size or 1  # no launcher world to fill
    if not _flags_ok(args, 0, world_size=args.tensor_parallel_size):
        return 1
    return run_frontend(args, _bind, _serve)


def _flags_ok(args: argparse.Namespace, rank: int, world_size: int | None = None) -> bool:
    """Every rank checks the same flags: each fails alone, without a collective."""
    if not size_http_pool(args, warn=rank == 0):
        return False
    try:
        check_args(args, world_size or int(os.environ.get("WORLD_SIZE", "1")))
    except FlagError as exc:
        log.error("%s", exc)
        return False
    return True


def _bind(args: argparse.Namespace, lazy):
    """The HTTP server on its port (None, logged, if the port cannot be had)."""
    from dstp.server.wsgi import make_wsgi_server

    _raise_fd_limit(connection_limit(args.http_threads) + 256)
    try:
        return make_wsgi_server(
            lazy,
            args.host,
            args.port,
            args.http_threads,
            args.max_body_bytes,
            request_read_timeout_s=args.request_read_timeout,
        )
    except OSError as exc:
        log.error("cannot listen on %s:%s: %s", args.host, args.port, exc)
        return None


def _served_name(args: argparse.Namespace, builtin: BuiltinModel | None) -> str:
    """The first --served-model-name, else --model as given (vLLM), else the built-in's id."""
    if args.served_model_name:
        return args.served_model_name[0]
    return builtin.model_id if builtin else args.model


def _start_engine(args: argparse.Namespace, model: str, builtin: BuiltinModel | None):
    """(engine, replica link, model folder) on every rank, or None once the cause is logged."""
    try:
        from dstp.model.hub import resolve_on_ranks, world_min_of

        if builtin is None:  # a folder or a hub id: each node's first rank fetches it
            from dstp.distributed import init_tp

            tp = init_tp(args.tensor_parallel_size)
            model = resolve_on_ranks(
                args.model,
                local_rank=tp.local_rank,
                world_min=world_min_of(tp),
                revision=args.revision,
                download_dir=args.download_dir,
                trust_remote_code=args.trust_remote_code,
                allow_pickle=args.allow_pickle,
            ).path
        _check_model(args, model)
        from dstp import replicas
        from dstp.engine.llm_engine import Engine

        engine = Engine(_engine_config(args, model, _served_name(args, builtin)))
        link = replicas.connect(engine)  # every rank: the other replicas' drivers to rank 0
    except FlagError as exc:
        log.error("%s", exc)
        return None
    except Exception as exc:
        if not _is_model_error(exc):
            log.exception("engine start-up failed")
        return None
    return engine, link, model


def _check_model(args: argparse.Namespace, model: str) -> None:
    """The flag checks that need the checkpoint's config (:func:`check_model_args`)."""
    import json
    from pathlib import Path

    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model, trust_remote_code=args.trust_remote_code)
    generation = Path(model) / "generation_config.json"
    eos = json.loads(generation.read_text()).get("eos_token_id") if generation.is_file() else None
    check_model_args(args, config, eos)
    policy = check_policy_choice(args, config)
    if policy is not None:
        from dstp.model.policy_source import describe

        log.info("%s", describe(policy, config))


def _run_role(args, engine, link, server, lazy, model: str, builtin: BuiltinModel | None) -> int:
    """What this rank does once the engine runs: serve HTTP (global rank 0), drive another
    replica, or follow its group's driver."""
    from dstp import replicas

    tp = engine.tp
    if tp.world_size > 1:
        tp.set_collective_timeout(args.step_timeout)  # a dead peer ends this rank within it
    if under_frontend():
        return _serve_frontend_job(args, engine)
    if tp.num_replicas > 1:
        log.info("global rank %d is rank %d of %s", tp.global_rank, tp.rank, tp.describe())
    if tp.is_driver and tp.replica != 0:  # another replica's driver: rank 0 routes to it
        code = replicas.serve_replica(engine, link, heartbeat_interval_s=args.heartbeat_interval)
        if code != 0:
            from dstp.distributed import abort_and_exit

            abort_and_exit(code)  # its group or rank 0 is gone: no exit-time barrier
        return code
    if tp.is_driver and link:
        engine = replicas.ReplicatedEngine(
            engine, link, liveness_timeout_s=args.rank_timeout, step_timeout_s=args.step_timeout
        )
        log.info(
            "%d replicas of TP=%d: %s",
            engine.num_replicas,
            tp.size,
            ", ".join(engine.layout.describe(r) for r in range(engine.num_replicas)),
        )
    if not tp.is_driver:
        return _follow(engine)
    return _serve(args, engine, server, lazy, model, builtin)


def _serve_frontend_job(args: argparse.Namespace, engine) -> int:
    """A rank of a supervised server's engine job: rank 0 steps for the front-end (as
    another replica's driver steps for global rank 0); the others follow it."""
    from dstp import replicas
    from dstp.frontend.wire import connect_to_frontend

    if not engine.tp.is_driver:
        return _follow(engine)
    if engine.tp.num_replicas > 1:
        log.error("a supervised server runs one replica: pass --tensor-parallel-size = ranks")
        return 1
    link = connect_to_frontend(engine)
    log.info("engine job ready: rank 0 serves the front-end")
    code = replicas.serve_replica(engine, link, heartbeat_interval_s=args.heartbeat_interval)
    if code != 0:
        from dstp.distributed import abort_and_exit

        abort_and_exit(code)  # the front-end or a rank is gone: no exit-time barrier
    return code


def _follow(engine) -> int:
    """A non-driver rank: run the steps its driver broadcasts until released.

    A failed step, or a collective that broke because a peer failed, aborts this rank's
    process groups and exits at once: its peers' collectives then fail now, not after
    the step timeout, and the launcher reports the non-zero exit.
    """
    from dstp.distributed import abort_and_exit

    log.info("rank %d/%d ready: following rank 0", engine.tp.rank, engine.tp.size)
    try:
        engine.run_follower()
    except Exception as exc:
        log.error(
            "rank %d: a step failed or the group broke (another rank failed or died): %r",
            engine.tp.rank,
            exc,
            exc_info=exc,
        )
        abort_and_exit(1)
    log.info("rank %d: released by rank 0, exiting", engine.tp.rank)
    return 0


def _serve(args, engine, server, lazy, model: str, builtin: BuiltinModel | None) -> int:
    from dstp.engine.tokenizer import load_tokenizer
    from dstp.server.app import create_app
    from dstp.server.engine_loop import EngineLoop, EngineUnavailable

    stop = threading.Event()
    fatal: list[BaseException] = []

    def on_fatal(exc: BaseException) -> None:
        fatal.append(exc)
        if engine.tp.world_size > 1:
            from dstp.distributed import abort_process_groups

            # no collective of this rank waits any more; the peers' fail as it exits
            abort_process_groups()
        stop.set()

    loop = EngineLoop(
        engine,
        max_queued_requests=args.max_queued_requests,
        heartbeat_interval_s=args.heartbeat_interval,
        heartbeat_timeout_s=args.rank_timeout,
        step_timeout_s=args.step_timeout,
        on_fatal=on_fatal,
    )
    try:
        loop.start(ready_timeout_s=max(60.0, args.rank_timeout))
    except EngineUnavailable as exc:
        log.error("%s", exc)
        os._exit(1)  # a rank is gone: skip the exit-time barrier that would wait for it

    config = _server_config(args, engine, model, builtin)
    tokenizer = load_tokenizer(model, args.trust_remote_code)  # the HTTP threads' own copy
    _apply_chat_template(args, tokenizer)
    lazy.app = create_app(loop, tokenizer, config)

    def on_signal(signum, _frame):
        if stop.is_set():
            log.warning("%s while stopping: exiting now", signal.Signals(signum).name)
            os._exit(1)
        log.info("%s received: stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    _log_serving(args, server, engine, config)
    _pump(server, stop)  # until a signal or a fatal engine error
    code = _shut_down(server, loop, lazy, fatal)
    if code != 0:
        logging.shutdown()
        os._exit(code)  # peers are gone: an exit-time barrier would only wait for them
    return code


def _server_config(args: argparse.Namespace, engine, model: str, builtin: BuiltinModel | None):
    from dstp.server.serving import ServerConfig

    served = list(args.served_model_name or [])
    name = _served_name(args, builtin)
    others = [n for n in dict.fromkeys([*served[1:], args.model, model, engine.model_name]) if n]
    return ServerConfig(
        model_name=name,
        max_model_len=engine.max_model_len,
        vocab_size=engine.vocab_size,
        api_key=args.api_key or os.environ.get("DSTP_API_KEY") or None,
        max_body_bytes=args.max_body_bytes,
        model_aliases=tuple(n for n in others if n != name),
        model_description=builtin.description if builtin else None,
        tp_size=engine.tp.size,
        log_requests=args.enable_log_requests,
        max_log_len=args.max_log_len,
        tools=ToolSettings(args.tool_call_parser, args.enable_auto_tool_choice),
        reasoning_parser=args.reasoning_parser,
        eos_ids=engine.eos_ids,
        block_size=engine.config.block_size,
        sampling_defaults=_sampling_defaults(args, model),
    )


def _is_model_error(exc: BaseException) -> bool:
    """Log a start-up failure that names its own cause (a bad --model, a checkpoint that
    cannot be read or split, another rank's failure) as one line; True if it was one."""
    from dstp.distributed import AnotherRankFailed
    from dstp.model.loading import CheckpointError
    from dstp.policies import TPConfigError

    if isinstance(exc, CheckpointError | TPConfigError):
        log.error("%s: %s", exc.__class__.__name__, exc)
        return True
    if isinstance(exc, AnotherRankFailed):
        log.error("%s", exc)
        return True
    return False


def _apply_chat_template(args: argparse.Namespace, tokenizer) -> None:
    """``--chat-template`` replaces the tokenizer's (the HTTP threads' copy renders chats)."""
    template = args.chat_template_text
    if template is None:
        return
    if tokenizer is None:
        log.warning("--chat-template ignored: this model has no tokenizer")
        return
    tokenizer.chat_template = template
    log.info("chat template from --chat-template (%d characters)", len(template))


def _sampling_defaults(args: argparse.Namespace, model: str):
    """``--generation-config`` and ``--seed``: defaults for what a request leaves out."""
    from dstp.server.defaults import SamplingDefaults, generation_defaults

    source = args.generation_config
    fields = {}
    if source not in ("vllm", "none"):
        fields = generation_defaults(model if source == "auto" else os.path.expanduser(source))
    if fields:
        log.info(
            "default sampling parameters from generation_config.json: %s (requests override "
            "them; --generation-config vllm turns them off)",
            ", ".join(f"{k}={v}" for k, v in fields.items()),
        )
    return SamplingDefaults(fields, args.seed)


def _log_serving(args: argparse.Namespace, server, engine, config) -> None:
    host, port = server.effective_host, server.effective_port
    log.info(
        "serving '%s' on http://%s:%s (TP=%d x %d replica(s), max_model_len=%d, API key %s) "
        "endpoints: /v1/completions /v1/chat/completions /v1/models /generate /tokenize "
        "/detokenize /health /metrics /version",
        config.model_name,
        host,
        port,
        engine.tp.size,
        engine.tp.num_replicas,
        engine.max_model_len,
        "required" if config.api_key else "off",
    )
    if args.host not in ("127.0.0.1", "localhost", "::1") and not config.api_key:
        log.warning("listening on %s without --api-key: anyone who can reach it may use it", host)


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
    from dstp.server.wsgi import pump_once

    while not stop.is_set():
        pump_once(server)


def _shut_down(server, loop, lazy, fatal: list[BaseException]) -> int:
    """Fail in-flight requests, keep the event loop running until their errors are written."""
    from dstp.server.wsgi import pump_once

    stopper = threading.Thread(
        target=loop.stop,
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
