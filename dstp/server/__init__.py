"""The HTTP server. Nothing is imported here: every rank imports ``dstp.server.serve``, and
only rank 0 should load Flask and waitress."""
