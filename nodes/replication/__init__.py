"""Replication, written once for every service: groups, command log, streams, snapshots."""
