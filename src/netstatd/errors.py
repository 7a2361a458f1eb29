"""Errors that end a process with one line to print (cli.py prints them)."""


class StartupError(RuntimeError):
    """Start-up cannot continue; the message is the one line to print."""
