"""keybroker: a trusted party that distributes keys, and the protocols that use them."""

__version__ = "0.1.0"
