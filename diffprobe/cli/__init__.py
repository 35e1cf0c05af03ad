"""Command-line interface: a thin Typer layer over the Python API.

Each pipeline stage has its own module registering its commands on the shared ``app``;
``main`` adds nnU-Net-style argument conventions and turns user errors into one clear
message and a non-zero exit code, without a traceback.
"""

from diffprobe.cli.app import app, main

__all__ = ["app", "main"]
