"""Rank worker: run engine scenarios from a job JSON; rank 0 writes results JSON.

Usage: engine_run.py JOB.json OUT.json. Each scenario builds an Engine with its
own settings and runs its prompts to completion; rank 0 records the outputs,
the engine stats and whether every KV block was free at the end.
"""

import json
import sys
from pathlib import Path

import dstp.engine.llm_engine
from dstp.distributed import shutdown
from dstp.engine.llm_engine import Engine, EngineConfig
from dstp.engine.sampling_params import SamplingParams

tokenizer_loads = []
_load = dstp.engine.llm_engine.load_tokenizer
dstp.engine.llm_engine.load_tokenizer = lambda *args: tokenizer_loads.append(args) or _load(*args)

argv = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # deepspeed adds it
job = json.loads(Path(argv[0]).read_text())
results = {}
for name, scenario in job["scenarios"].items():
    engine = Engine(EngineConfig(**scenario["engine"]))
    if not engine.tp.is_driver:
        engine.run_follower()
        # a follower runs its model shard only: no tokenizer, scheduler or server
        assert engine.tokenizer is None and engine.scheduler is None
        loaded = [m for m in sys.modules if m.startswith(("dstp.server", "flask", "waitress"))]
        assert not loaded, loaded
        assert not tokenizer_loads, "a follower loaded the tokenizer"
        continue
    params = [SamplingParams(**p) for p in scenario["params"]]
    abort_after = scenario.get("abort_after_steps")
    if abort_after is not None:  # start everything, abort the first half mid-flight
        ids = [f"r{i}" for i in range(len(params))]
        for rid, prompt, p in zip(ids, scenario["prompts"], params, strict=True):
            engine.add_request(rid, prompt, p)
        for _ in range(abort_after):
            engine.step()
        for rid in ids[: len(ids) // 2]:
            engine.abort(rid)
        aborted = set()
        while engine.has_unfinished():
            for out in engine.step():
                if out.finished and out.outputs[0].finish_reason == "abort":
                    aborted.add(out.request_id)
        outs = []
        record = {"aborted": sorted(aborted)}
    else:
        outs = engine.generate(scenario["prompts"], params)
        record = {}
    record["outputs"] = [
        [
            {
                "token_ids": c.token_ids,
                "text": c.text,
                "finish_reason": c.finish_reason,
                "stop_reason": c.stop_reason,
                "logprobs": [
                    [lp.token_id, lp.logprob, {str(k): v for k, v in lp.top.items()}]
                    for lp in c.logprobs
                ]
                if c.logprobs is not None
                else None,
            }
            for c in out.outputs
        ]
        for out in outs
    ]
    record["stats"] = engine.stats()
    record["all_blocks_free"] = engine.scheduler.allocator.all_free()
    results[name] = record
    engine.shutdown()
if results:
    Path(argv[1]).write_text(json.dumps(results))
print("worker done", flush=True)
shutdown(exit_code=0)  # leave the group together; skip gloo's racy C++ teardown
