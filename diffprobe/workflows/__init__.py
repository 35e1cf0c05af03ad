"""Orchestration: the multi-stage runs built on top of the stage APIs.

Nothing below this package imports it (the CLI registers it); stages stay usable alone.
"""
