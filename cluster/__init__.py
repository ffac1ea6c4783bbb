"""An emulated multi-node cluster on one machine: network namespaces behind a switch namespace
(netns.py); the torchrun agents that run in them come on top (issue 28)."""
