"""Sharding: device mesh, logical-axis rules, sharded creation, batch placement."""
