"""``python -m diffprobe`` = the ``diffprobe`` command."""

from diffprobe.cli import main

main()
