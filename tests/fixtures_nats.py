"""NATS fixtures (real nats-server on a random loopback port, and the in-memory bus)."""
