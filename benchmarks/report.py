"""Turn the per-rank JSON files of one run into the comparison table (markdown + JSON).

Every ratio is oriented so that > 1 means dstp is better: for latencies and
memory it is ``other / dstp``, for throughputs ``dstp / other``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

GB = 1e9

# the configurations whose batch-1 decode is set against the read roofline, in report order
ROOFLINE_CONFIGS = (
    "dstp", "dstp_engine", "dstp_aten_gemv", "dstp_avx2_gemv", "hf", "ds_autotp", "hf_1thread",
)  # fmt: skip


def load_results(out: Path) -> dict[str, list[dict]]:
    """config -> per-rank results (rank order)."""
    by_config: dict[str, list[dict]] = {}
    for file in sorted(out.glob("*.rank*.json")):
        data = json.loads(file.read_text())
        by_config.setdefault(data["config"], []).append(data)
    for ranks in by_config.values():
        ranks.sort(key=lambda r: r["rank"])
    return by_config


def _prefill(r: list[dict], n: int) -> float | None:
    for p in r[0].get("prefill", []):
        if p["tokens"] == n:
            return p["median_s"]
    return None


def _decode(r: list[dict], b: int) -> float | None:
    for d in r[0].get("decode", []):
        if d["batch"] == b:
            return d["tok_s"]
    return None


def _peak_rss(r: list[dict]) -> float | None:
    """Highest per-rank peak RSS while loading."""
    return max(x["memory"]["peak_rss"] for x in r) / GB if r else None


def _peak_rss_run(r: list[dict]) -> float | None:
    """Highest per-rank peak RSS over the whole run (loading and every phase)."""
    if not r:
        return None

    def run_peak(x: dict) -> float:
        phases = x["memory"].get("phase_peaks_gb", {})
        # the harness's own LM-head probe (a batch-4 call) is not part of the workload
        kept = [v for k, v in phases.items() if not k.startswith("LM-head probe")]
        return max([x["memory"]["peak_rss"] / GB, *kept])

    return max(run_peak(x) for x in r)


def _workload(r: list[dict], key: str) -> float | None:
    w = r[0].get("workload") if r else None
    return w.get(key) if w else None


# (label, getter, direction): "lower" = lower is better (latency, memory)
def rows(results: dict[str, list[dict]], prefill: list[int], batches: list[int]) -> list[tuple]:
    spec: list[tuple[str, Any, str]] = [
        ("peak RSS per rank, loading (GB)", _peak_rss, "lower"),
        ("peak RSS per rank, whole run (GB)", _peak_rss_run, "lower"),
    ]
    spec += [(f"prefill {n} tokens (s)", lambda r, n=n: _prefill(r, n), "lower") for n in prefill]
    spec += [(f"decode batch {b} (tok/s)", lambda r, b=b: _decode(r, b), "higher") for b in batches]
    if results.get("dstp_engine"):
        spec += [
            (f"decode batch {b}, dstp engine (tok/s)", lambda r, b=b: _decode(r, b), "higher")
            for b in batches
        ]
    spec += [
        ("64-request workload: output tok/s", lambda r: _workload(r, "output_tok_s"), "higher"),
        ("workload TTFT p50 (s)", lambda r: _workload(r, "ttft_p50_s"), "lower"),
        ("workload TTFT p99 (s)", lambda r: _workload(r, "ttft_p99_s"), "lower"),
        ("workload TPOT p50 (s)", lambda r: _workload(r, "tpot_p50_s"), "lower"),
        ("workload TPOT p99 (s)", lambda r: _workload(r, "tpot_p99_s"), "lower"),
    ]
    return spec


def _ratio(ours: float | None, other: float | None, direction: str) -> float | None:
    if ours is None or other is None or ours == 0 or other == 0:
        return None
    return other / ours if direction == "lower" else ours / other


def _fmt(v: float | None, digits: int = 3) -> str:
    if v is None:
        return "–"
    return f"{v:.{digits}g}" if abs(v) < 1000 else f"{v:.0f}"


def _dstp_ranks(results: dict, label: str) -> list[dict]:
    """The dstp figure for a row: the engine for engine and workload rows, dstp.load otherwise."""
    if label.startswith("64-request") or label.startswith("workload") or "engine" in label:
        return results.get("dstp_engine") or results.get("dstp", [])
    return results.get("dstp", [])


def comparison(results: dict[str, list[dict]], prefill: list[int], batches: list[int]) -> dict:
    table = []
    for label, get, direction in rows(results, prefill, batches):
        ours = get(_dstp_ranks(results, label)) if _dstp_ranks(results, label) else None
        hf = get(results["hf"]) if results.get("hf") else None
        ds = get(results["ds_autotp"]) if results.get("ds_autotp") else None
        if ours is None and hf is None and ds is None:
            continue
        table.append(
            {
                "metric": label,
                "dstp": ours,
                "hf": hf,
                "ds_autotp": ds,
                "vs_hf": _ratio(ours, hf, direction),
                "vs_ds_autotp": _ratio(ours, ds, direction),
            }
        )
    return {"rows": table}


def roofline(results: dict, decode_bytes: int, bandwidth_gbs: float) -> dict:
    """Batch-1 decode as a fraction of bandwidth / weight bytes read per token."""
    ceiling = bandwidth_gbs * GB / decode_bytes
    out = {"bandwidth_gbs": bandwidth_gbs, "bytes_per_step": decode_bytes, "ceiling_tok_s": ceiling}
    for name in ROOFLINE_CONFIGS:
        tok_s = _decode(results.get(name, []), 1) if results.get(name) else None
        if tok_s:
            out[name] = {"tok_s": tok_s, "fraction": tok_s / ceiling}
    return out


def limits(
    results: dict,
    sizes: dict,
    bandwidth_gbs: float,
    gemm_peak_gflops: float,
    prefill: list[int],
    batches: list[int],
) -> dict:
    """Every timed row of every configuration as a fraction of this machine's limit for it.

    Prefill and the workload are bound by compute: their linear-layer FLOPs (2 per
    multiply-add; a prefill's LM head runs for its last token only) over the GEMM limit
    of as many cores as ranks (the median rate at the run's start and end). Batch-b decode is bound by whichever is slower,
    reading every weight once (the read roofline) or its FLOPs at that peak.
    """
    body, lm = sizes["body_params"], sizes["lm_head_params"]
    peak, bandwidth = gemm_peak_gflops * 1e9, bandwidth_gbs * GB
    out = {}
    for name, ranks in results.items():
        rows: dict[str, float] = {}
        for n in prefill:
            seconds = _prefill(ranks, n)
            if seconds:
                rows[f"prefill {n}"] = 2 * (n * body + lm) / peak / seconds
        for b in batches:
            tok_s = _decode(ranks, b)
            if tok_s:
                step_s = max(sizes["decode_bytes_per_step"] / bandwidth, 2 * b * (body + lm) / peak)
                rows[f"decode batch {b}"] = tok_s * step_s / b
        w = ranks[0].get("workload") or {}
        if w.get("prompt_tokens") is not None:
            flops = 2 * (w["prompt_tokens"] * body + w["output_tokens"] * (body + lm))
            rows["64-request workload"] = flops / peak / w["wall_s"]
        out[name] = {"kernels": ranks[0].get("kernels"), "fractions": rows}
    return out


def limits_markdown(summary: dict) -> str:
    """The fractions of :func:`limits`, one row per configuration."""
    lim = summary.get("limits") or {}
    columns = sorted({k for v in lim.values() for k in v["fractions"]}, key=_column_order)
    if not columns:
        return ""
    g = summary["gemm_peaks"]
    skip = ("processes", "shape", "best", "end", "limit")
    kinds = ", ".join(f"{k} {g[k]:.1f}" for k in g if k not in skip)
    end = g.get("end", g)
    lines = [
        "",
        f"Each row as a fraction of this machine's limit: read roofline "
        f"{summary['roofline']['bandwidth_gbs']:.1f} GB/s for decode; GEMM limit "
        f"{g.get('limit', g['best']):.1f} GFLOP/s for prefill and batched work: the median of "
        f"the fastest type's median-call rate at the start ({g['best']:.1f}) and end "
        f"({end['best']:.1f}) of the run ({g['processes']} pinned single-thread processes, "
        f"{'x'.join(map(str, g['shape']))}; at the start: {kinds}).",
        "",
        "| config | bf16 linear kernels | " + " | ".join(columns) + " |",
        "|---|---|" + "---|" * len(columns),
    ]
    for name, entry in lim.items():
        kernels = "; ".join(f"{k}: {v}" for k, v in (entry.get("kernels") or {}).items())
        cells = [
            f"{100 * entry['fractions'][c]:.0f}%" if c in entry["fractions"] else "–"
            for c in columns
        ]
        lines.append(f"| {name} | {kernels or '?'} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _column_order(column: str) -> tuple[int, int]:
    kind, _, number = column.rpartition(" ")
    order = {"prefill": 0, "decode batch": 1}.get(kind, 2)
    return (order, int(number) if number.isdigit() else 0)


def _dstp_fractions(summary_limits: dict, prefix: str) -> list[float]:
    rows = []
    for name in ("dstp", "dstp_engine"):
        fractions = summary_limits.get(name, {}).get("fractions", {})
        rows += [v for k, v in fractions.items() if k.startswith(prefix)]
    return rows


def targets(
    table: dict, roof: dict, ckpt_bytes: int, results: dict, lim: dict | None = None
) -> list[tuple[str, bool | None]]:
    """The issues' targets at TP=2, each met / missed / not measured (None)."""
    by = {r["metric"]: r for r in table["rows"]}
    rss = _peak_rss(results.get("dstp", []))

    def cmp(metric: str, key: str, need: float) -> bool | None:
        v = by.get(metric, {}).get(key)
        return None if v is None else v >= need

    def within_hf(metric: str) -> bool | None:
        v = by.get(metric, {}).get("vs_hf")
        return None if v is None else v >= 1 / 1.3

    fractions = [roof[n]["fraction"] for n in ("dstp", "dstp_engine") if n in roof]
    frac = max(fractions) if fractions else None
    ckpt = ckpt_bytes / GB
    return [
        (
            f"peak RSS/rank <= 0.6 x ckpt + 0.3 GB = {0.6 * ckpt + 0.3:.2f} GB (issue 2)",
            None if rss is None else rss <= 0.6 * ckpt + 0.3,
        ),
        (
            f"peak RSS/rank <= 0.6 x ckpt = {0.6 * ckpt:.2f} GB (issue 6)",
            None if rss is None else rss <= 0.6 * ckpt,
        ),
        (
            "prefill 128 >= 5x faster than DS AutoTP",
            cmp("prefill 128 tokens (s)", "vs_ds_autotp", 5),
        ),
        (
            "prefill 1024 >= 5x faster than DS AutoTP",
            cmp("prefill 1024 tokens (s)", "vs_ds_autotp", 5),
        ),
        ("prefill 128 within 1.3x of HF", within_hf("prefill 128 tokens (s)")),
        ("prefill 1024 within 1.3x of HF", within_hf("prefill 1024 tokens (s)")),
        ("batch-1 decode >= 90% of roofline", None if frac is None else frac >= 0.9),
        *_machine_limit_targets(table, lim or {}),
        (
            "workload >= 4x HF static output tok/s",
            cmp("64-request workload: output tok/s", "vs_hf", 4)
            if results.get("dstp_engine")
            else None,
        ),
    ]


def _machine_limit_targets(table: dict, lim: dict) -> list[tuple[str, bool | None]]:
    """Issue 14: every row beats HF and DS AutoTP, and each is near this machine's limit."""
    timed = [r for r in table["rows"] if not r["metric"].startswith("peak RSS")]
    ratios = [r[k] for r in timed for k in ("vs_hf", "vs_ds_autotp") if r[k] is not None]
    decode1 = [
        v
        for n in ("dstp", "dstp_engine")
        for k, v in lim.get(n, {}).get("fractions", {}).items()
        if k == "decode batch 1"
    ]
    prefill = _dstp_fractions(lim, "prefill")
    work = _dstp_fractions(lim, "64-request")

    def at_least(values: list[float], need: float, best: bool = False) -> bool | None:
        if not values:
            return None
        return (max(values) if best else min(values)) >= need

    return [
        ("every timed row >= HF and >= DS AutoTP (issue 14)", at_least(ratios, 1.0)),
        ("batch-1 decode >= 85% of the read roofline (issue 22)", at_least(decode1, 0.85, True)),
        ("prefill >= 80% of the GEMM limit (issue 22)", at_least(prefill, 0.80)),
        ("request workload >= 75% of the GEMM limit (issue 22)", at_least(work, 0.75)),
    ]


def markdown(summary: dict) -> str:
    m = summary["machine"]
    bw = summary["bandwidth"]
    lines = [
        f"Machine: {m.get('cpu')} ({m.get('cpus')} cores, {m.get('mem_gib')} GiB, "
        f"{', '.join(m.get('isa', []))}; {m.get('hypervisor')} guest), torch {m.get('torch')}; "
        f"load average at start {m.get('load_avg_1m', 0):.2f}.",
        f"Checkpoint: {summary['checkpoint']} ({summary['checkpoint_bytes'] / GB:.2f} GB, bf16). "
        f"TP={summary['tp']}; HF is one process with {summary['hf_threads']} threads.",
        f"Memory bandwidth: read {bw['read_gbs']:.1f} GB/s, copy {bw['copy_gbs']:.1f} GB/s "
        f"({bw['threads']} threads); 1 thread: read {summary['bandwidth_1t']['read_gbs']:.1f} GB/s"
        + (
            f"; {summary['bandwidth_pinned']['processes']} pinned single-thread processes at once: "
            f"read {summary['bandwidth_pinned']['read_gbs']:.1f} GB/s"
            if "bandwidth_pinned" in summary
            else ""
        )
        + ". The roofline uses the highest read figure.",
        "",
        "| metric | dstp TP=2 | HF 1 process | DS AutoTP TP=2 | dstp vs HF | dstp vs DS AutoTP |",
        "|---|---|---|---|---|---|",
    ]
    for r in summary["table"]["rows"]:
        ratio = [f"{_fmt(r[k])}x" if r[k] is not None else "–" for k in ("vs_hf", "vs_ds_autotp")]
        lines.append(
            f"| {r['metric']} | {_fmt(r['dstp'])} | {_fmt(r['hf'])} | {_fmt(r['ds_autotp'])} "
            f"| {ratio[0]} | {ratio[1]} |"
        )
    lines.append("")
    lines.append(
        "Ratios: > 1 means dstp is better (other/dstp for latency and memory, dstp/other for throughput)."
    )
    lines.append(
        "Workload rows: dstp = the continuous-batching engine when measured; HF and DS AutoTP = HF `generate` with static batches."
    )
    roof = summary["roofline"]
    lines += [
        "",
        f"Batch-1 decode roofline: {roof['bandwidth_gbs']:.1f} GB/s / {roof['bytes_per_step'] / GB:.2f} GB "
        f"per token = {roof['ceiling_tok_s']:.2f} tok/s.",
    ]
    for name in ROOFLINE_CONFIGS:
        if name in roof:
            lines.append(
                f"- {name}: {roof[name]['tok_s']:.2f} tok/s = {100 * roof[name]['fraction']:.0f}% of roofline"
            )
    lines += ["", "Targets:"]
    for text, ok in summary["targets"]:
        mark = "not measured" if ok is None else ("met" if ok else "MISSED")
        lines.append(f"- {text}: {mark}")
    mem = summary.get("memory_detail", {})
    if mem:
        lines += [
            "",
            "Peak memory per rank (GB): total RSS = private (anon) + mapped checkpoint pages (file):",
            "",
        ]
        lines += [
            "| config | rank | RSS before load | peak RSS | peak anon | peak file-backed | RSS after load | load s |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name, ranks in mem.items():
            for r in ranks:
                lines.append(
                    f"| {name} | {r['rank']} | {r['rss_before_load']:.2f} | {r['peak_rss']:.2f} | {r['peak_anon']:.2f} | "
                    f"{r['peak_file']:.2f} | {r['rss_after_load']:.2f} | {r['load_s']:.1f} |"
                )
    return "\n".join(lines) + "\n"


def memory_detail(results: dict) -> dict:
    out = {}
    for name, ranks in results.items():
        out[name] = [
            {
                "rank": r["rank"],
                "peak_rss": r["memory"]["peak_rss"] / GB,
                "peak_anon": r["memory"]["peak_anon"] / GB,
                "peak_file": r["memory"]["peak_file"] / GB,
                "rss_after_load": r["memory"]["rss_after_load"] / GB,
                "rss_before_load": r["memory"].get("rss_before_load", 0) / GB,
                "load_s": r["load_s"],
            }
            for r in ranks
        ]
    return out


def breakdown_markdown(results: dict) -> str:
    """Where dstp's time goes (rank by rank): profiler categories, timers, free-comm runs."""
    ranks = results.get("dstp", [])
    if not ranks or "breakdown" not in ranks[0]:
        return ""
    lines = ["", "## Where dstp's time goes (TP=2)", ""]
    cats = ("linear", "attention", "comm", "other_ops", "untracked")
    lines.append("| phase | rank | wall (s, profiled) | " + " | ".join(cats) + " |")
    lines.append("|---|---|---|" + "---|" * len(cats))
    for r in ranks:
        b = r["breakdown"]
        for phase in ("prefill", "decode"):
            p = b[f"{phase}_profile"]
            fr = p["fraction"]
            lines.append(
                f"| {phase} | {r['rank']} | {p['wall_s']:.3f} | "
                + " | ".join(f"{100 * fr.get(c, 0):.1f}%" for c in cats)
                + " |"
            )
    lines += [
        "",
        "| phase | rank | wall (s) | all-reduce (s) | calls | all-reduce share | wall without all-reduce (s) | comm cost share |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in ranks:
        b = r["breakdown"]
        for phase in ("prefill", "decode"):
            t = b[f"{phase}_timers"]
            f = b[f"{phase}_free_comm"]
            lines.append(
                f"| {phase} | {r['rank']} | {t['wall_s']:.3f} | {t['all_reduce_s']:.4f} | "
                f"{t['all_reduce_calls']} | {100 * t['all_reduce_fraction']:.1f}% | "
                f"{f['wall_no_allreduce_s']:.3f} | {100 * f['comm_cost_fraction']:.1f}% |"
            )
    b0 = ranks[0]["breakdown"]
    d = b0["decode_free_comm"]
    if "step_s" in d:
        lines.append("")
        lines.append(
            f"Decode step (rank 0): {1000 * d['step_s']:.1f} ms; with all-reduce made free "
            f"{1000 * d['step_no_allreduce_s']:.1f} ms."
        )
    lines += ["", "Top ops by self time, rank 0:", ""]
    for phase in ("prefill", "decode"):
        ops = b0[f"{phase}_profile"]["top_ops"][:8]
        lines.append(
            f"- {phase}: "
            + "; ".join(f"{o['op']} {1000 * o['self_s']:.0f} ms ({o['calls']})" for o in ops)
        )
    return "\n".join(lines) + "\n"


def all_configs_markdown(results: dict, prefill: list[int], batches: list[int]) -> str:
    """Every configuration that ran (extras included), raw figures side by side."""
    head = (
        ["config", "peak RSS load (GB)", "peak RSS run (GB)"]
        + [f"prefill {n} (s)" for n in prefill]
        + [f"decode b{b} (tok/s)" for b in batches]
        + ["workload tok/s"]
    )
    lines = ["", "## Every configuration", "", "| " + " | ".join(head) + " |"]
    lines.append("|" + "---|" * len(head))
    for name, ranks in sorted(results.items()):
        cells = [name, _fmt(_peak_rss(ranks)), _fmt(_peak_rss_run(ranks))]
        cells += [_fmt(_prefill(ranks, n)) for n in prefill]
        cells += [_fmt(_decode(ranks, b)) for b in batches]
        cells.append(_fmt(_workload(ranks, "output_tok_s")))
        lines.append("| " + " | ".join(cells) + " |")
        for note in ranks[0].get("skipped", []):
            lines.append(f"|  ↳ {name}: skipped {note} |" + " |" * (len(head) - 1))
    return "\n".join(lines) + "\n"
