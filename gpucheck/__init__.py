"""The prepared first GPU run (``python3 -m gpucheck.check``, ``make gpu-check``): sections, test suite
shards, results report, wheel bundle (``python3 -m gpucheck.bundle``), host-sync counting."""
