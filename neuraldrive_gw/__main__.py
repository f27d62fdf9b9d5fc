"""`python -m neuraldrive_gw` is the `neuraldrive-gw` command."""

from .cli import main

main()
