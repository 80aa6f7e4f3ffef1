"""The version of vpeft, recorded in every adapter file it writes. This module imports nothing from vpeft."""

__version__ = "0.1.0"
