"""Small helpers with no knowledge of nodes: files, locks, backoff, logs, parsing."""
