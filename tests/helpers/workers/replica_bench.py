"""The 64-request workload (benchmarks/workload.py) over W ranks as W/T replicas of TP=T.

Usage (under the launcher or tests.helpers.launcher.run_ranks):
    replica_bench.py MODEL TP OUT.json [DTYPE] [NUM_REQUESTS]
Global rank 0 drives a ReplicatedEngine (one replica: the plain Engine) through
``workload.run_engine`` and writes its summary plus each replica's request count.
"""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # the repo: benchmarks/

from benchmarks import workload  # noqa: E402
from dstp import replicas  # noqa: E402
from dstp.distributed import shutdown  # noqa: E402
from dstp.engine.llm_engine import Engine, EngineConfig  # noqa: E402

argv = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
model, tp_size, out = argv[0], int(argv[1]), argv[2]
dtype = argv[3] if len(argv) > 3 else "float32"
num_requests = int(argv[4]) if len(argv) > 4 else 64
engine = Engine(
    EngineConfig(
        model=model,
        dtype=dtype,
        kv_cache_memory_gib=1.0,
        max_model_len=1024,
        tensor_parallel_size=tp_size,
    )
)
tp = engine.tp
link = replicas.connect(engine)
if not tp.is_driver:
    engine.run_follower()
    shutdown(exit_code=0)
if tp.replica != 0:
    code = replicas.serve_replica(engine, link)
    if code:
        os._exit(code)
    shutdown(exit_code=0)
driver = replicas.ReplicatedEngine(engine, link) if link else engine
spec = {"num_requests": num_requests, "seed": 0}
result = workload.run_engine(driver, spec, engine.vocab_size)
result["tp"] = tp.size
result["replicas"] = tp.num_replicas
result["fast_all_reduce"] = tp.fast_all_reduce
if link:
    result["assigned_requests"] = list(driver.router.assigned)
    result["engine_stats"].pop("replicas", None)
driver.shutdown()
Path(out).write_text(json.dumps(result, indent=1))
print(json.dumps({k: v for k, v in result.items() if k != "engine_stats"}), flush=True)
shutdown(exit_code=0)
