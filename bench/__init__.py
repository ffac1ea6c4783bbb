"""Measurement and checks: the prepared first GPU run (``make gpu-check``) and its wheel bundle."""
