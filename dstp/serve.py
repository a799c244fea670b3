"""``python -m dstp.serve``: the server as a module, for launchers that start modules.

From an installed wheel (no source checkout, so no ``launch/serve.py``)::

    deepspeed --num_gpus 2 --module dstp.serve --model meta-llama/Llama-3.2-1B
    torchrun --nproc_per_node 2 -m dstp.serve --model meta-llama/Llama-3.2-1B

The flags are ``dstp serve``'s (``python -m dstp.serve --help``).
"""

from __future__ import annotations

import sys

from dstp.server.main import build_parser, main


def run(argv: list[str] | None = None) -> int:
    parser = build_parser()
    parser.prog = "python -m dstp.serve"
    return main(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(run())
