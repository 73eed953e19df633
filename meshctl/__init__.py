"""meshctl: the command a person uses to run and inspect a Mesh."""
