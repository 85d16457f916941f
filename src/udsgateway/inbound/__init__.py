"""inbound: see docs/architecture.md."""
