"""An emulated multi-node cluster on one machine: network namespaces behind a switch namespace
(netns.py) and one torchrun agent per node in them (agents.py), issue 28."""
