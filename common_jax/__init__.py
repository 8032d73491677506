"""The engine both model families share: layers, mesh/sharding, data, optimisers, checkpoints, loop."""
