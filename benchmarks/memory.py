"""Peak resident memory of this process, split into private and file-backed pages.

``VmHWM`` (what ``ru_maxrss`` reports) counts every resident page, including
pages of a memory-mapped safetensors file that the loader touched; those are
page cache shared by every rank that maps the file, not memory the rank owns.
A sampler thread therefore also records the peak of ``RssAnon`` (private
memory: the rank's own tensors) and of ``RssFile`` while loading, so the
report can say which of the two a peak came from.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

_STATUS = Path("/proc/self/status")
_FIELDS = ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem")


def status() -> dict[str, int]:
    """Current /proc/self/status memory fields, in bytes (empty off Linux)."""
    out: dict[str, int] = {}
    try:
        for line in _STATUS.read_text().splitlines():
            key, _, value = line.partition(":")
            if key in _FIELDS:
                out[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return out


def reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS, for per-phase peaks."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class PeakSampler:
    """Samples /proc/self/status every ``interval_s`` while active (a context manager)."""

    def __init__(self, interval_s: float = 0.005) -> None:
        self.interval_s = interval_s
        self.peak: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        for key, value in status().items():
            if value > self.peak.get(key, 0):
                self.peak[key] = value

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            time.sleep(self.interval_s)

    def __enter__(self) -> PeakSampler:
        self.before = status()  # what imports alone cost (torch, transformers, deepspeed)
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def report(self) -> dict[str, int]:
        """Peak total RSS (kernel high-water mark) and sampled peaks of its parts."""
        now = status()
        return {
            "peak_rss": now.get("VmHWM", self.peak.get("VmRSS", 0)),
            "peak_anon": self.peak.get("RssAnon", 0),
            "peak_file": self.peak.get("RssFile", 0),
            "rss_after_load": now.get("VmRSS", 0),
            "anon_after_load": now.get("RssAnon", 0),
            "rss_before_load": getattr(self, "before", {}).get("VmRSS", 0),
        }
