"""The engine both model families share: the family protocol (`family`), the one train loop
(`train`, `task`), layers and logical axis names, mesh/sharding, data, optimisers, Orbax
checkpoints, the weights layer (`weights`, `trees`) and metrics."""
