"""Entry point of `python -m attent_vision.data.synthetic`."""

from .cli import main

main()
