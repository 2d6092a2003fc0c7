"""Isolation backends (L2), one subpackage each; see :func:`cellos.hosts.registry.make_backend`."""
