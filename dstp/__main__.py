"""The ``dstp`` command (also ``python -m dstp``): one subcommand per module, each owning its flags.

Each subcommand module exposes ``add_arguments(parser)`` and ``main(args) -> int``. Launchers
that start modules run the server as ``deepspeed --module dstp serve ...`` or
``torchrun -m dstp serve ...``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from dstp import __version__

# subcommand -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("dstp.server.serve", "serve a model over an OpenAI-compatible HTTP API"),
    "inspect": (
        "dstp.tools.inspection",
        "show the injection policy and per-rank shapes for a TP size",
    ),
    "plan": ("dstp.tools.planner", "recommend a TP size from config.json and device memory"),
}


def build_parser(prog: str = "dstp") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"dstp {__version__}")
    # `deepspeed --module dstp serve` puts its --local_rank=N before the subcommand
    parser.add_argument(
        "--local_rank", "--local-rank", type=int, default=argparse.SUPPRESS, help=argparse.SUPPRESS
    )
    subs = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sub = subs.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(_module=module_name)
        importlib.import_module(module_name).add_arguments(sub)
    return parser


def main(argv: list[str] | None = None, prog: str = "dstp") -> int:
    args = build_parser(prog).parse_args(argv)
    return int(importlib.import_module(args._module).main(args) or 0)


if __name__ == "__main__":
    sys.exit(main(prog="python -m dstp"))
