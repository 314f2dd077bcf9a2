"""Devices and processes: the one sharding table, meshes, and multi-host coordination."""
