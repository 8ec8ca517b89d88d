"""The asyncio edge: one TLS stream per ``protocol.Connection`` (session),
and one package across one hop (transfer)."""
