"""Errors that are the user's to fix, as opposed to bugs in vpeft.

A :class:`UserError` says in one paragraph what is wrong, where (file, config key, path, option) and what would be
right. The command-line tools print that paragraph and exit with status 2; any other exception is a bug and keeps its
traceback. Each subclass also derives from the built-in exception the same mistake has always raised (``ValueError``,
``FileNotFoundError``, ``FileExistsError``, ``KeyError``, ``ImportError``), so ``except ValueError:`` in a user's code
keeps working.
This module imports nothing from vpeft, so every layer, the core included, may raise these.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the user's input: a config, an option, a file, the data or the installation."""

    def __str__(self) -> str:  # KeyError would otherwise print its message in quotes
        return str(self.args[0]) if self.args else ""


class ConfigError(UserError, ValueError):
    """A config key, method option or command-line value that is wrong (type, range, unknown name, conflict)."""


class UnknownNameError(UserError, KeyError):
    """A name that is not registered (method, task, dataset, backbone...); the message lists close matches."""


class DataError(UserError, ValueError):
    """Data that cannot be used as it is: an unreadable or truncated file, a label out of range, NaN values."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder the user named, or the run needs, is not there."""


class ExistingPathError(UserError, FileExistsError):
    """A file or folder the user named already holds something else (a run, other data) that vpeft will not replace."""


class DivergedError(UserError, FloatingPointError):
    """Training stopped on a NaN or infinite loss: the learning rate, the precision or the data need a change."""


class ArgumentTypeError(UserError, TypeError):
    """A value of the wrong type passed to a vpeft function (a name where the model is expected)."""


class MissingDependencyError(UserError, ImportError):
    """An optional Python package (name its extra: ``pip install 'vpeft[medical]'``) or a system package is missing."""


class OptionError(ConfigError):
    """A method option that is wrong: out of range, not one of the choices, or at odds with another option.

    ``option`` is the option's name (``r``), so a run config can name the key it came from (``method.r``) and its file.
    """

    def __init__(self, message: str, option: str = ""):
        super().__init__(message)
        self.option = option


class OptionTypeError(OptionError, TypeError):
    """A method option of the wrong type, or one the method does not have; also a ``TypeError``, as Python raises for
    a wrong or unexpected keyword argument."""
