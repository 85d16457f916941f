"""hl7: see docs/architecture.md."""
