"""The child half, shared by relays and clients: the session to the parent
(``uplink``), fetching packages from it (``fetcher``) and taking in the jobs
it sends (``intake``)."""
