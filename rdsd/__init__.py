"""rdsd: software distribution through relays to clients."""
