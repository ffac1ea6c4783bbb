"""The training job as components: config, trainer (step + loop), checkpoint, preemption, faults,
metrics, evaluation and the run report. Entry points live in launcher/; this package parses no
command line."""
