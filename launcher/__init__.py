"""msmoe.launcher."""
