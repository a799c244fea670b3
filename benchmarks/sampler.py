"""One sampler step at batch 64 over a 128k vocabulary: the per-row oracle against dstp's sampler.

    python benchmarks/sampler.py [--batch 64] [--vocab 128256] [--prompt 500]
                                 [--steps 10] [--oracle-steps 2] [--scale 4] [--threads 1]
                                 [--kinds greedy,mixed,plain] [--accelerator-path]

Three batches: greedy rows (temperature 0); mixed rows (temperature 0.8,
top-p 0.9, half of them with top-k 50, repetition penalty 1.1 and frequency
penalty 0.3); plain rows (temperature 1, no filter: OpenAI's defaults). Prompts are random ids; each step appends the drawn token to
every row's output, as the engine does, so the penalty counts are updated
incrementally. Logits are i.i.d. N(0, scale^2): at scale 4 and temperature 0.8
each row's top 1024 tokens hold ~99 % of its mass, so no row needs the
whole-row fallback; a smaller scale (2, say) flattens the rows and sends most of
them to it (top-p by a radix select over the row, dstp/engine/sampling/filters.py). With
dstp's CPU kernels built, every sampled row goes through one fused call instead (whole rows,
no prefix: dstp/cpu/csrc/sampler_ops.cpp's ``sample_rows``); ``DSTP_CPU_KERNELS=0`` runs the
plain PyTorch path above. Prints the median milliseconds per step, wall and CPU time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for tests.helpers.reference_sampler

from dstp.engine.sampling import SampleState, make_generator, sample  # noqa: E402
from dstp.engine.sampling import step as sampling_step  # noqa: E402
from dstp.engine.sampling_params import SamplingParams  # noqa: E402
from tests.helpers import reference_sampler  # noqa: E402


def params(kind: str, row: int) -> SamplingParams:
    if kind == "greedy":
        return SamplingParams(temperature=0.0)
    if kind == "plain":  # the OpenAI defaults: the whole vocabulary is a candidate
        return SamplingParams(temperature=1.0)
    return SamplingParams(
        temperature=0.8,
        top_p=0.9,
        top_k=50 if row % 2 else -1,
        repetition_penalty=1.1,
        frequency_penalty=0.3,
    )


def states(kind: str, batch: int, vocab: int, prompt: int) -> list[SampleState]:
    gen = torch.Generator().manual_seed(0)
    return [
        SampleState(
            params(kind, i),
            torch.randint(vocab, (prompt,), generator=gen).tolist(),
            [],
            make_generator(None, 0),
        )
        for i in range(batch)
    ]


def per_step_ms(fn, kind: str, args: argparse.Namespace, steps: int) -> tuple[float, float]:
    """Median wall and CPU ms of ``steps`` steps, after one warm-up step (which builds the
    penalty counts). On one thread the CPU time is the step's cost on an idle machine more
    nearly than the wall time is where other processes share the cores."""
    rows = states(kind, args.batch, args.vocab, args.prompt)
    outputs: list[list[int]] = [[] for _ in rows]
    gen = torch.Generator().manual_seed(1)
    logits = [torch.randn(args.batch, args.vocab, generator=gen) * args.scale for _ in range(2)]
    times, cpu_times = [], []
    for step in range(steps + 1):
        for state, out in zip(rows, outputs, strict=True):
            state.output_ids = out
        started, cpu_started = time.perf_counter(), time.process_time()
        picks = fn(logits[step % 2], rows)
        elapsed, cpu_elapsed = time.perf_counter() - started, time.process_time() - cpu_started
        if step:
            times.append(elapsed * 1e3)
            cpu_times.append(cpu_elapsed * 1e3)
        for out, row in zip(outputs, picks, strict=True):
            out.append(row[0][0])
    return statistics.median(times), statistics.median(cpu_times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--prompt", type=int, default=500)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--oracle-steps", type=int, default=2)
    parser.add_argument("--scale", type=float, default=4.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--kinds", default="greedy,mixed,plain")
    parser.add_argument(
        "--accelerator-path",
        action="store_true",
        help="run the path an accelerator takes (every sampled row over its whole row, no "
        "mid-step read; dstp/engine/sampling/step.py) on the CPU",
    )
    args = parser.parse_args()
    sampling_step.HOST_BRANCH = not args.accelerator_path
    torch.set_num_threads(args.threads)
    print(
        f"batch {args.batch}, vocab {args.vocab}, {args.prompt}-token prompts, "
        f"logits N(0, {args.scale:g}^2), {torch.get_num_threads()} thread(s), torch {torch.__version__}"
    )
    for kind in args.kinds.split(","):
        new, new_cpu = per_step_ms(sample, kind, args, args.steps)
        old, old_cpu = per_step_ms(reference_sampler.sample, kind, args, args.oracle_steps)
        print(
            f"{kind:6s}  oracle {old:8.1f} ms/step ({old_cpu:.1f} CPU)   "
            f"dstp.engine.sampling {new:7.1f} ms/step ({new_cpu:.1f} CPU)"
        )


if __name__ == "__main__":
    main()
