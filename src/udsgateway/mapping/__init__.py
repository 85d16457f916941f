"""mapping: see docs/architecture.md."""
