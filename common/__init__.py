"""msmoe.common: the leaf every other package stands on; it knows nothing of MoE, ReID or ranks.

  config   the typed config builder (from_dict: every value checked against its field's
           annotation, Literal fields against their allowed values), ConfigError, require
  errors   UserError, the base of every error a user can fix (the CLI prints it and exits 2)
  files    atomic writes (a reader sees the old content or the new, never half of either)
  plots    matplotlib on the Agg backend and the atomic PNG writer
  compat   the torch calls whose availability differs between the supported versions
  timing   stage timers (null and wall-clock) and torch.profiler ranges

It imports only the standard library, torch, yaml, numpy and matplotlib (tests/unit/test_layering.py).
"""
