"""The method: per-step batch norm, the network, adaptation, the meta-step and its schedules."""
