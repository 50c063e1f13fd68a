"""The long-running service: config, state dir, logging, control socket."""
