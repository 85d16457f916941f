"""The operations layer: what an operator can see and do in a running gateway."""
