"""``--policy FILE_OR_MODULE``: a user's own injection policies, imported before the model is built.

The file (a path to a ``.py`` file) or module (a dotted name) registers policies when imported
(``dstp.policies.register(...)`` at its top level). Registration order makes them win over the
built-in and derived ones for the architectures they name. ``dstp serve`` (on every rank),
``dstp inspect`` and ``dstp.load(policy=...)`` import it the same way; every failure is a
:class:`PolicySourceError` whose message is one line naming the fix.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
import traceback
from pathlib import Path
from typing import Any

GUIDE = "docs/writing-a-policy.md, 'Serve your own policy'"

# value of --policy -> the policies importing it registered (an import runs once per process)
_LOADED: dict[str, tuple[Any, ...]] = {}
# id(policy) -> the --policy value it came from
_ORIGINS: dict[int, str] = {}


class PolicySourceError(ValueError):
    """A ``--policy`` value cannot be used; the message (one line) says why and what to do."""


def import_policies(value: str, flag: str = "--policy") -> tuple[Any, ...]:
    """Import ``value`` (a .py file or a dotted module name) and return the policies it
    registered, newest first. Raises :class:`PolicySourceError`."""
    if value in _LOADED:
        return _LOADED[value]
    from dstp import policies

    before = len(policies.registered())
    if _is_file_value(value):
        _exec_file(value, flag)
    else:
        _import_module(value, flag)
    after = policies.registered()
    new = tuple(after[: len(after) - before])  # register() inserts at the front
    if not new:
        raise PolicySourceError(
            f"{flag} {value} registered no policy: call dstp.policies.register(policy) at its "
            f"top level (see {GUIDE})"
        )
    for policy in new:
        _ORIGINS[id(policy)] = value
    _LOADED[value] = new
    return new


def origin(policy: Any) -> str | None:
    """The ``--policy`` value that registered ``policy``, if one did."""
    return _ORIGINS.get(id(policy))


def chosen_policy(config: Any, loaded: tuple[Any, ...], value: str, flag: str = "--policy"):
    """The policy dstp picks for ``config``; it must be one ``value`` registered (else the user
    would silently get another one). Raises :class:`PolicySourceError`."""
    from dstp.policies import policy_for

    policy = policy_for(config)
    if any(policy is p for p in loaded):
        return policy
    names = ", ".join(
        f"{p.name!r} ({', '.join(p.architectures or p.model_types) or '-'})" for p in loaded
    )
    archs = list(getattr(config, "architectures", None) or [])
    raise PolicySourceError(
        f"{flag} {value} registered {names}, none of them for this model "
        f"(architectures {archs or '?'}, model_type {getattr(config, 'model_type', None)!r}; "
        f"dstp would use {policy.name!r}): add the model's architecture to the policy's "
        "`architectures`"
    )


def describe(policy: Any, config: Any) -> str:
    """Where ``policy`` came from, for the start-up log and ``dstp inspect``."""
    from dstp.policies import registered

    archs = ", ".join(policy.architectures or policy.model_types) or config.model_type
    source = origin(policy)
    if source is not None:
        return (
            f"policy {policy.name!r} from --policy {source}, registered for {archs}: {policy.doc}"
        )
    if any(policy is p for p in registered()):
        return f"explicit policy {policy.name!r}, registered for {archs}: {policy.doc}"
    return f"no explicit policy for {config.model_type!r}; {policy.name!r} {policy.doc}"


def _is_file_value(value: str) -> bool:
    return value.endswith(".py") or os.sep in value or "/" in value or os.path.exists(value)


def _exec_file(value: str, flag: str) -> None:
    path = Path(value).expanduser().resolve()
    if not path.is_file():
        raise PolicySourceError(
            f"{flag} {value}: no such file; pass a .py file that calls "
            f"dstp.policies.register(policy), or a module's dotted name (see {GUIDE})"
        )
    name = "dstp_user_policy_" + hashlib.sha1(str(path).encode()).hexdigest()[:12]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise PolicySourceError(f"{flag} {value}: not importable as Python; pass a .py file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look the module up by name
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        sys.modules.pop(name, None)
        raise PolicySourceError(
            f"{flag} {value}: importing it failed: {_one_line(exc, str(path))}; fix the file"
        ) from None


def _import_module(value: str, flag: str) -> None:
    try:
        importlib.import_module(value)
    except ModuleNotFoundError as exc:
        if exc.name and (value == exc.name or value.startswith(exc.name + ".")):
            raise PolicySourceError(
                f"{flag} {value}: no such file or module; pass a path to a .py file that calls "
                "dstp.policies.register(policy), or the dotted name of an importable module "
                f"(see {GUIDE})"
            ) from None
        raise PolicySourceError(
            f"{flag} {value}: importing it failed: {_one_line(exc, None)}; fix the module"
        ) from None
    except Exception as exc:
        raise PolicySourceError(
            f"{flag} {value}: importing it failed: {_one_line(exc, None)}; fix the module"
        ) from None


def _one_line(exc: BaseException, path: str | None) -> str:
    """``Type: message (line N)``, N the last line of the user's file in the traceback."""
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    frames = [
        f
        for f in traceback.extract_tb(exc.__traceback__)
        if (f.filename == path if path else not f.filename.startswith("<frozen"))
    ]
    if isinstance(exc, SyntaxError) or not frames:
        return text
    return f"{text} (line {frames[-1].lineno} of {frames[-1].filename})"
