"""The coordinator: leader election, the cluster map, failover, moves, admin API."""
