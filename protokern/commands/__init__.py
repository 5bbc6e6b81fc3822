"""One module per ``protokern`` command, named after it (``protokern/cli.py`` dispatches)."""
