"""Runnable examples of the Mesh client (``python -m clients.examples.<name> --help``)."""
