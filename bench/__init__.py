"""Layer and expert-parallel benchmarks (``msmoe bench layer|ep``, ``msmoe fit``): layer, peers, ep, fit."""
