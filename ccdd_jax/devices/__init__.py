"""Devices and hosts below the method: the mesh, sharding, concurrent programs, and the
processes of a multi-process run (hosts: who they are; supervisor: one-line failures)."""
