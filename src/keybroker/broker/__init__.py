"""keybroker.broker: the trusted party's domain logic over the store."""
