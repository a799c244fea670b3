"""Serve a model with tensor parallelism: ``deepspeed --num_gpus N launch/serve.py --model PATH``.

Also runs under ``torchrun --nproc_per_node N`` and as a plain script (TP=1).
The flags are ``dstp serve``'s; see ``--help``.
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script from a source checkout: make `dstp` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dstp.server.serve import build_parser, main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(build_parser().parse_args()))
