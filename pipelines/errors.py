"""Errors that mean the input data (not the code or the config) is at fault."""


class DataError(ValueError):
    """Bad, missing or insufficient input data; the message names the file, row or key."""
