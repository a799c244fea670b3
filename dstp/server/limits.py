"""The HTTP server's limits, in a module that imports nothing: the flags' help quotes them
and every rank builds the flags, but only rank 0 loads waitress.

Every admitted generation request holds one waitress thread until its last byte is
written (WSGI is synchronous), so the request pool is sized from the admission limit
(``http_threads``): then the limit, not the pool, is what runs out, and the spare threads
answer the 429s at once. GET /health, /metrics and /v1/models, and waitress's own error
answers, run on a small pool of their own ("fast lane"), so they answer within
milliseconds however many streams are running. Slow clients are bounded on the
event-loop side: a whole request (headers and body) must arrive within
``REQUEST_READ_TIMEOUT_S`` (a "slowloris" trickling one byte at a time resets waitress's
idle timer forever), an idle connection closes after ``IDLE_TIMEOUT_S``, and at most
``connection_limit(threads)`` connections are open at once (further ones wait in the
listen backlog).
"""

RESERVE_THREADS = 16  # request threads beyond the admission limit: 4xx/429 answers, quick requests
FAST_THREADS = 4  # the fast lane
FAST_PATHS = frozenset(("/health", "/metrics", "/v1/models", "/version"))
REQUEST_READ_TIMEOUT_S = 30.0  # to receive one whole request, from its first byte
IDLE_TIMEOUT_S = 30  # a connection with no request in progress
MAX_HEADER_BYTES = 64 * 1024  # request line + headers (larger: 431)
# A body over --max-body-bytes is still read (and dropped) to its end, up to this, before
# the 413 goes out: a client that is still sending when the server closes gets a reset,
# not the answer (urllib, requests and curl without Expect all send the whole body first).
DRAIN_MAX_BYTES = 256 * 1024 * 1024
RECV_BYTES = 64 * 1024  # per read() of a socket (waitress: 8 KiB)


def http_threads(max_queued_requests: int) -> int:
    """Request threads for an admission limit: one per admitted request plus the reserve."""
    return max_queued_requests + RESERVE_THREADS


def connection_limit(threads: int) -> int:
    """Open connections at most: every thread's, as many again idle or being read, >= 100."""
    return max(100, 2 * (threads + FAST_THREADS))
