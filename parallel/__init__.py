"""msmoe.parallel."""
