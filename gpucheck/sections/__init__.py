"""The gpu-check sections, one process each (gpucheck/section.py is their shared frame)."""
