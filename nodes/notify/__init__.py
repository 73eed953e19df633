"""Notifications: channels with a replicated history, per-user inboxes, presence."""
