"""The shape of a batch-8 decode step: ops per decoder layer, ops outside the layers, readbacks.

Issue 22's table, counted on the CPU at TP=1 (tests/helpers/step_counts.py has the method):
a random bf16 Llama (hidden 256), 8 requests decoding together with temperature, top-p,
top-k, repetition penalty and seeds, five decode steps under a ``TorchDispatchMode``; the
layer share is (8-layer model - 4-layer model) / 4; readbacks are the calls that would make
the host wait for a GPU (``tolist``, ``item``, ``cpu``, ``numpy``, ``.to("cpu")``), list
uploads the ``torch.tensor(..., device=...)`` calls. For dstp's CPU kernels and for plain
PyTorch (``DSTP_CPU_KERNELS=0``, what a GPU runs), each with the policy's fused decoder
layers and with HF's (``EngineConfig.fused_layers``). Each configuration runs in its own
process (``DSTP_CPU_KERNELS`` is read once per process).

    python benchmarks/step_shape.py            # the table (eight subprocesses, a few minutes)
    python benchmarks/step_shape.py --sites    # and where each readback / upload is made
    python benchmarks/step_shape.py --show-ops # and the ops outside the forward, by name
    python benchmarks/step_shape.py --accelerator-sampler  # and a row with the sampler path
                                               # an accelerator takes (no prefix, no mid-step read)
    python benchmarks/step_shape.py --one LAYERS FUSED   # one configuration, as JSON
    make step-shape ARGS=--sites

Targets (issue 22, with the kernels): at most 16 ops per decoder layer, 80 outside the
layers and 2 host readbacks per step.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # for tests.helpers.step_counts

import torch  # noqa: E402

from tests.helpers import step_counts  # noqa: E402

TARGETS = {"layer": 16, "outside": 80, "readbacks": 2}


def one(layers: int, fused: bool) -> dict:
    if os.environ.get("DSTP_STEP_SHAPE_ACCELERATOR_SAMPLER") == "1":
        from dstp.engine.sampling import step as sampling_step

        sampling_step.HOST_BRANCH = False  # the sampler path an accelerator takes, on the CPU
    engine = step_counts.build_engine(layers, fused_layers=fused)
    counted = step_counts.count_decode_steps(engine)
    engine.shutdown()
    steps = counted.steps
    return {
        "step": counted.step.num_ops / steps,
        "forward": counted.forward.num_ops / steps,
        "forward_ops": dict(counted.forward.ops),
        "outside_forward_ops": {
            k: (v - counted.forward.ops.get(k, 0)) / steps
            for k, v in counted.step.ops.items()
            if v > counted.forward.ops.get(k, 0)
        },
        "readbacks": counted.step.num_readbacks / steps,
        "uploads": counted.step.num_uploads / steps,
        "readback_sites": {k: v / steps for k, v in counted.step.readbacks.items()},
        "upload_sites": {k: v / steps for k, v in counted.step.uploads.items()},
        "fused_layers": counted.fused_layers,
    }


def run_one(layers: int, fused: bool, kernels: bool, accelerator_sampler: bool = False) -> dict:
    env = dict(os.environ, DSTP_CPU_KERNELS="1" if kernels else "0", PYTHONPATH=str(REPO))
    env["DSTP_STEP_SHAPE_ACCELERATOR_SAMPLER"] = "1" if accelerator_sampler else "0"
    argv = [sys.executable, __file__, "--one", str(layers), str(int(fused))]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def row(kernels: bool, fused: bool, accelerator_sampler: bool = False) -> tuple[dict, dict]:
    """(the table's numbers, the 8-layer run) of one configuration."""
    big = run_one(8, fused, kernels, accelerator_sampler)
    small = run_one(4, fused, kernels, accelerator_sampler)
    per_layer = (big["forward"] - small["forward"]) / 4
    return {
        "layer": per_layer,
        "outside": big["step"] - 8 * per_layer,
        "readbacks": big["readbacks"],
        "uploads": big["uploads"],
        "fused": f"fused ({big['fused_layers']}/8)" if fused else "HF's",
    }, big


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--one", nargs=2, type=int, metavar=("LAYERS", "FUSED"))
    parser.add_argument("--sites", action="store_true", help="where readbacks and uploads are")
    parser.add_argument(
        "--accelerator-sampler",
        action="store_true",
        help="also the plain-PyTorch rows with the sampler path an accelerator takes (every "
        "sampled row over its whole row, no mid-step read; dstp/engine/sampling/step.py)",
    )
    parser.add_argument(
        "--show-ops", action="store_true", help="the ops outside the forward, by name"
    )
    args = parser.parse_args()
    if args.one:
        torch.set_num_threads(1)
        print(json.dumps(one(args.one[0], bool(args.one[1]))))
        return
    print(
        "| path | decoder layer | ops per decoder layer | ops per step outside the layers "
        "| host readbacks per step | `torch.tensor(..., device=)` per step |"
    )
    print("|---|---|---|---|---|---|")
    sites = []
    configs = [(k, f, False) for k in (True, False) for f in (True, False)]
    if args.accelerator_sampler:
        configs += [(False, True, True)]
    for kernels, fused, accelerator_sampler in configs:
        numbers, big = row(kernels, fused, accelerator_sampler)
        path = "dstp with its CPU kernels" if kernels else "`DSTP_CPU_KERNELS=0`"
        if accelerator_sampler:
            path += ", an accelerator's sampler path"
        print(
            f"| {path} | {numbers['fused']} | {numbers['layer']:.1f} | "
            f"{numbers['outside']:.0f} | {numbers['readbacks']:g} | {numbers['uploads']:g} |"
        )
        sites.append((path, numbers["fused"], big))
    print(
        f"| target (issue 22, with the kernels) | | {TARGETS['layer']} | {TARGETS['outside']} | "
        f"{TARGETS['readbacks']} | |"
    )
    for path, fused, big in sites:
        if args.sites:
            print(f"\n{path}, {fused} layers, readbacks and list uploads per step:")
            for site, n in {**big["readback_sites"], **big["upload_sites"]}.items():
                print(f"  {n:g}  {site}")
        if args.show_ops:
            ops = sorted(big["outside_forward_ops"].items(), key=lambda kv: -kv[1])
            shown = ", ".join(f"{name} {n:g}" for name, n in ops)
            print(f"\n{path}, {fused} layers, ops per step outside the forward: {shown}")


if __name__ == "__main__":
    main()
