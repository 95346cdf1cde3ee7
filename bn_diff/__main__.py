"""`python -m bn_diff`."""

from .cli import main

main()
