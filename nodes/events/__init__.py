"""The event store: append-only streams, replicated per group and kept on disk."""
