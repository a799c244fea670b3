"""``--model``: a local checkpoint folder or a Hugging Face hub id, resolved to a folder.

A hub id (``org/name``) is looked up in the local Hugging Face cache first (the hub's
layout: ``models--org--name/snapshots/<commit>/``, ``refs/<revision>``) and only fetched
when the cache lacks it and ``HF_HUB_OFFLINE`` is not set. Only what serving reads is
fetched (:data:`ALLOW_PATTERNS`: safetensors, config, tokenizer and generation files;
Python files too with ``--trust-remote-code``), never pickled ``*.bin`` weights.

Across ranks (:func:`resolve_on_ranks`): the first rank of each node resolves (so a node
downloads once, not once per rank) while the others wait; then every other rank finds
the folder in its node's cache. A failure anywhere stops every rank, each with one line.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dstp.distributed import agree
from dstp.model.loading import SAFETENSORS_INDEX, CheckpointError

log = logging.getLogger("dstp")

# What a served model needs from its repo; anything else (pickles, ONNX, GGUF, original/
# folders of other formats) is left on the hub.
ALLOW_PATTERNS = [
    "*.safetensors",
    SAFETENSORS_INDEX,
    "config.json",
    "generation_config.json",
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "*.tiktoken",
    "chat_template.*",
]
REMOTE_CODE_PATTERNS = ["*.py"]  # only with --trust-remote-code
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


class ModelNotFoundError(CheckpointError):
    """``--model`` names no usable checkpoint; the message (one line) says why and what to do."""


@dataclass(frozen=True)
class ResolvedModel:
    path: str  # the local folder to load
    repo_id: str | None = None  # the hub id it came from; None for a local folder


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE")


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``), read now, not at import time."""
    return _truthy("HF_HUB_OFFLINE") or _truthy("TRANSFORMERS_OFFLINE")


def hub_cache_dir(download_dir: str | None = None) -> str:
    """Where hub snapshots live: ``--download-dir``, else ``$HF_HUB_CACHE``, else HF's default."""
    if download_dir:
        return str(Path(download_dir).expanduser())
    if os.environ.get("HF_HUB_CACHE"):
        return os.path.expanduser(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return os.path.join(os.path.expanduser(os.environ["HF_HOME"]), "hub")
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def is_hub_id(model: str) -> bool:
    """Whether ``model`` (not an existing path) reads as a hub id rather than a local path."""
    if not model or model.startswith(("/", ".", "~")) or model.count("/") > 1:
        return False
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(model)
    except HFValidationError:
        return False
    return True


def resolve(
    model: str,
    *,
    revision: str | None = None,
    download_dir: str | None = None,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    local_only: bool = False,
) -> ResolvedModel:
    """The folder ``--model`` means, downloading a hub id's serving files if needed.

    ``local_only``: use the cache only (the ranks that wait for their node's first rank).
    Raises :class:`ModelNotFoundError` with a one-line message.
    """
    path = Path(model).expanduser()
    if path.is_dir():
        if revision:
            log.warning("--revision %s is ignored for the local folder %s", revision, path)
        return ResolvedModel(str(path))
    if path.exists():
        raise ModelNotFoundError(
            f"--model {model!r} is a file; pass the checkpoint folder that holds config.json "
            "and the *.safetensors files"
        )
    if not is_hub_id(model):
        raise ModelNotFoundError(
            f"model path {model!r} does not exist (and it is not a Hugging Face hub id of the "
            "form 'org/name'); pass a checkpoint folder or a hub id"
        )
    return ResolvedModel(
        _resolve_hub(
            model,
            revision,
            hub_cache_dir(download_dir),
            trust_remote_code,
            allow_pickle,
            local_only,
        ),
        repo_id=model,
    )


def _resolve_hub(
    repo_id: str,
    revision: str | None,
    cache_dir: str,
    trust_remote_code: bool,
    allow_pickle: bool,
    local_only: bool,
) -> str:
    patterns = ALLOW_PATTERNS + (REMOTE_CODE_PATTERNS if trust_remote_code else [])
    where = f"{repo_id!r}" + (f" at revision {revision!r}" if revision else "")
    cached = _cached_snapshot(repo_id, revision, cache_dir, patterns)
    if cached is not None and _has_weights(cached):
        (log.debug if local_only else log.info)("%s: using the cached snapshot %s", where, cached)
        return cached
    offline = hub_offline()
    if local_only or offline:
        if cached is not None:  # pickles only: an error unless allowed (then they load)
            _refuse_unusable(where, cached, allow_pickle, f"the cached snapshot {cached}")
            return cached
        why = "HF_HUB_OFFLINE is set" if offline else "the node's first rank did not fetch it"
        raise ModelNotFoundError(
            f"{where} is not a local folder and not in the Hugging Face cache at {cache_dir} "
            f"({why}); download it there first (`hf download {repo_id}`), point HF_HUB_CACHE or "
            "--download-dir at the cache that holds it, or pass a local folder"
        )
    files = _remote_files(repo_id, revision, where)
    _refuse_unusable(where, files, allow_pickle, "the repo", remote=True)
    log.info("%s: fetching the serving files into %s", where, cache_dir)
    folder = _call_hub(
        where,
        "snapshot_download",
        repo_id=repo_id,
        revision=revision,
        cache_dir=cache_dir,
        allow_patterns=patterns,
    )
    if not _has_weights(folder):
        _refuse_unusable(where, folder, allow_pickle, f"the downloaded snapshot {folder}")
    return folder


def _cached_snapshot(
    repo_id: str, revision: str | None, cache_dir: str, patterns: list[str]
) -> str | None:
    """The cached snapshot folder for the revision (no network), or None."""
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=cache_dir,
            allow_patterns=patterns,
            local_files_only=True,
        )
    except (OSError, ValueError):  # not cached, or cached but incomplete
        return None


def _has_weights(folder: str | list[str]) -> bool:
    names = _names(folder)
    return SAFETENSORS_INDEX in names or any(n.endswith(".safetensors") for n in names)


def _names(folder: str | list[str]) -> list[str]:
    if isinstance(folder, list):
        return [n.rsplit("/", 1)[-1] for n in folder if "/" not in n]  # top-level files only
    return [p.name for p in Path(folder).iterdir()]


def _refuse_unusable(
    where: str, folder: str | list[str], allow_pickle: bool, what: str, remote: bool = False
) -> None:
    """One-line errors for a snapshot (or a repo's file list) without safetensors weights."""
    if _has_weights(folder):
        return
    pickles = sorted(n for n in _names(folder) if n.endswith(PICKLE_SUFFIXES))
    if pickles and not remote and allow_pickle:
        return  # already on disk and explicitly allowed: the checkpoint reader takes them
    if pickles:
        raise ModelNotFoundError(
            f"{where}: {what} has only pickled weights ({', '.join(pickles[:3])}"
            f"{', ...' if len(pickles) > 3 else ''}), no *.safetensors; dstp fetches "
            "safetensors only (pickles can run code when loaded). Use a safetensors "
            "revision or conversion of the model, or convert a local copy with "
            "save_pretrained and pass its folder"
        )
    raise ModelNotFoundError(
        f"{where}: {what} has no *.safetensors weights; dstp serves safetensors checkpoints "
        "(a config-only repo, an adapter or a GGUF repo is not one)"
    )


def _remote_files(repo_id: str, revision: str | None, where: str) -> list[str]:
    from huggingface_hub import HfApi

    return _call_hub(where, HfApi().list_repo_files, repo_id, revision=revision)


def _call_hub(where: str, fn, *args, **kwargs):
    """Call the hub; its errors become one-line :class:`ModelNotFoundError`s."""
    from huggingface_hub import errors

    if isinstance(fn, str):
        import huggingface_hub

        fn = getattr(huggingface_hub, fn)
    repo = args[0] if args else kwargs.get("repo_id")
    try:
        return fn(*args, **kwargs)
    except errors.GatedRepoError:
        raise ModelNotFoundError(
            f"{where} is a gated repo: accept its terms on https://huggingface.co/{repo} "
            "and log in (`hf auth login`, or set HF_TOKEN) with an account that has access"
        ) from None
    except errors.RepositoryNotFoundError:
        raise ModelNotFoundError(
            f"{where}: no such repo on the Hugging Face Hub (or it is private: log in with "
            "`hf auth login` or set HF_TOKEN); check the spelling, or pass a local folder"
        ) from None
    except errors.RevisionNotFoundError:
        raise ModelNotFoundError(
            f"{where}: the repo has no such revision (branch, tag or commit)"
        ) from None
    except (errors.HfHubHTTPError, OSError) as exc:  # network down, hub errors, disk full
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelNotFoundError(
            f"{where}: cannot fetch it from the Hugging Face Hub ({first}); check the network, "
            "or set HF_HUB_OFFLINE=1 and use a cached copy or a local folder"
        ) from None


def resolve_on_ranks(
    model: str,
    *,
    local_rank: int = 0,
    world_min: Callable[[int], int] | None = None,
    poll_s: float = 0.5,
    **kwargs,
) -> ResolvedModel:
    """:func:`resolve` across the launcher's world: each node's first rank (``local_rank``
    0) resolves (and downloads) while the others wait; then they resolve from their node's
    cache. Every rank raises if any failed. ``world_min(value)``: the smallest value any
    rank of the world holds (a collective; None: a single process, see :func:`world_min_of`).

    Waiting is a loop of short collectives, not one long one, so a download may take longer
    than the process group's timeout.
    """
    if world_min is None:
        return resolve(model, **kwargs)
    leader = local_rank == 0
    outcome: list = []  # [ResolvedModel] or [exception], set by the leader's worker thread

    def work() -> None:
        try:
            outcome.append(resolve(model, **kwargs))
        except Exception as exc:  # reported on every rank below
            outcome.append(exc)

    worker = None
    if leader:
        worker = threading.Thread(target=work, name="dstp-resolve", daemon=True)
        worker.start()
    while world_min(0 if worker is not None and worker.is_alive() else 1) == 0:
        time.sleep(poll_s)

    def leader_result() -> ResolvedModel | None:
        if outcome and isinstance(outcome[0], BaseException):
            raise outcome[0]
        return outcome[0] if outcome else None

    first = agree(leader_result, world_min)
    # Every rank takes part in both agreements (collectives pair up in order).
    return agree(lambda: first if leader else resolve(model, local_only=True, **kwargs), world_min)


def world_min_of(tp) -> Callable[[int], int] | None:
    """``world_min`` for :func:`resolve_on_ranks` over a :class:`~dstp.distributed.TPGroup`'s
    whole world (every replica's ranks, over gloo), or None for a single process."""
    if tp.world_size <= 1:
        return None
    group = tp.world_cpu_group

    def world_min(value: int) -> int:
        import torch
        import torch.distributed as tdist

        wire = torch.tensor([value], dtype=torch.long)
        tdist.all_reduce(wire, op=tdist.ReduceOp.MIN, group=group)
        return int(wire[0])

    return world_min
