"""The flows: protocols built on the broker core (a flow never imports another)."""
