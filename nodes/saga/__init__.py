"""Sagas: orchestrated distributed transactions with compensation (mesh.saga.v1)."""
