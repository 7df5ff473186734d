"""The ``lmnet`` command line; each sub-command is a thin wrapper over an importable function."""
from lmnet.cli.main import main

__all__ = ["main"]
