"""The ``vpdm`` command line: train, evaluate, predict, calibrate, export, config."""

from vpdm.cli.commands import build_parser, main

__all__ = ["build_parser", "main"]
