"""Reasoning Mesh: a gRPC service that spends extra inference compute only where it pays."""

__version__ = "0.1.0"
