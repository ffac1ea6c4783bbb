"""msmoe.reid."""
