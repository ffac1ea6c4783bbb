"""Scaling up: the throughput sweep (sweep, points), the network model (comm_model), the projection and
its report, the ablation table, and the one campaign runner (campaign) both sweeps run through."""
