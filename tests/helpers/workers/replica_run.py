"""Rank worker for data-parallel replicas: W ranks as W/T replicas of TP=T.

Usage: replica_run.py JOB.json OUT.json. Every rank builds its Engine at
``job["tp"]``; global rank 0 drives a ReplicatedEngine (replica 0 locally, the
others over their connections), the other replicas' drivers serve it, and the
remaining ranks follow their driver. Rank 0 writes:

* ``greedy``: each prompt's token ids and text, and which replica served it;
* ``abort``: long requests on every replica; those on the last replica are aborted
  mid-flight; the per-replica stats right after their abort outputs arrived, and at
  the end.
"""

import json
import os
import sys
import threading
import time
from pathlib import Path

from dstp import replicas
from dstp.distributed import shutdown
from dstp.engine.llm_engine import Engine, EngineConfig
from dstp.engine.sampling_params import SamplingParams

argv = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
job = json.loads(Path(argv[0]).read_text())
engine = Engine(
    EngineConfig(
        model=job["model"],
        dtype="float32",
        kv_cache_memory_gib=job.get("kv_cache_memory_gib", 0.02),
        tensor_parallel_size=job["tp"],
    )
)
tp = engine.tp
print(f"rank {tp.global_rank}: {tp.describe()} rank {tp.rank}/{tp.size}", flush=True)
link = replicas.connect(engine, timeout_s=120)
if tp.global_rank == job.get("kill_rank"):
    threading.Timer(job.get("kill_after_s", 5.0), os._exit, args=(17,)).start()
if not tp.is_driver:
    engine.run_follower()
    print("worker done", flush=True)
    shutdown(exit_code=0)
if tp.replica != 0:
    code = replicas.serve_replica(engine, link, heartbeat_interval_s=0.5)
    print("worker done", flush=True)
    if code:
        os._exit(code)
    shutdown(exit_code=0)

rep = replicas.ReplicatedEngine(engine, link)
results: dict = {"num_replicas": rep.num_replicas, "fast_all_reduce": tp.fast_all_reduce}

if job.get("kill_rank") is not None:  # a rank of another replica dies under load
    try:
        while True:
            rep.generate(
                [engine.tokenizer.encode(p) for p in job["prompts"]],
                SamplingParams(max_tokens=64, ignore_eos=True),
            )
    except RuntimeError as exc:
        print(f"rank 0 saw: {exc}", flush=True)
        os._exit(3)  # a rank is gone: no exit-time barrier

# greedy: the same prompts as a single engine, all at once
greedy = SamplingParams(max_tokens=job["max_tokens"], temperature=0.0)
prompts = [engine.tokenizer.encode(p) for p in job["prompts"]]
ids = [f"g{i}" for i in range(len(prompts))]
where = {}
for rid, prompt in zip(ids, prompts, strict=True):
    rep.add_request(rid, prompt, greedy)
    where[rid] = rep.replica_of(rid)
final = {}
while rep.has_unfinished():
    for out in rep.step():
        if out.finished:
            final[out.request_id] = out
results["greedy"] = [
    {
        "token_ids": final[rid].outputs[0].token_ids,
        "text": final[rid].outputs[0].text,
        "replica": where[rid],
    }
    for rid in ids
]

# seeded sampling: the same seed on every replica gives the same text
seeded = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=1234, n=2)
seeded_ids = [f"s{i}" for i in range(rep.num_replicas * 2)]
seeded_where = []
for rid in seeded_ids:
    rep.add_request(rid, prompts[0], seeded)
    seeded_where.append(rep.replica_of(rid))
final = {}
while rep.has_unfinished():
    for out in rep.step():
        if out.finished:
            final[out.request_id] = out
results["seeded"] = [[c.token_ids for c in final[rid].outputs] for rid in seeded_ids]
results["seeded_replicas"] = seeded_where

# abort: long requests everywhere, abort those of the last replica mid-flight
long = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
ids = [f"a{i}" for i in range(4 * rep.num_replicas)]
assigned = {}
for i, rid in enumerate(ids):
    rep.add_request(rid, prompts[i % len(prompts)], long)
    assigned[rid] = rep.replica_of(rid)
last = rep.num_replicas - 1
victims = [rid for rid in ids if rep.replica_of(rid) == last]
produced: set[str] = set()
deadline = time.monotonic() + 60
while not set(victims) <= produced and time.monotonic() < deadline:
    for out in rep.step():
        if out.outputs[0].new_token_ids:
            produced.add(out.request_id)
mid = rep.stats()["replicas"]
for rid in victims:
    rep.abort(rid)
aborted: set[str] = set()
while not set(victims) <= aborted and time.monotonic() < deadline:
    for out in rep.step():
        if out.finished and out.outputs[0].finish_reason == "abort":
            aborted.add(out.request_id)
after_abort = rep.stats()["replicas"]
while rep.has_unfinished():
    rep.step()
time.sleep(1.2)  # let the remotes' idle stats arrive
rep.heartbeat()
results["abort"] = {
    "victims": victims,
    "aborted": sorted(aborted),
    "assigned": assigned,
    "mid": mid,
    "after_abort": after_abort,
    "end": rep.stats()["replicas"],
}
results["assigned_requests"] = list(rep.router.assigned)
rep.shutdown()
Path(argv[1]).write_text(json.dumps(results))
print("worker done", os.getpid(), flush=True)
shutdown(exit_code=0)
