"""``python -m service.cli``: the console script."""

from service.cli import main

main()
