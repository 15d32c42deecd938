"""Devices and hosts below the method: the mesh, sharding, concurrent programs."""
