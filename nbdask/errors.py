"""Exceptions and warnings raised by nbdask.

Every message names the variable (or option), what was found, and what to do about it.
"""


class NbdaskError(Exception):
    """Base class of nbdask's errors."""


class CubeError(NbdaskError, ValueError):
    """The count cube does not follow the input schema (design §2)."""


class SourceError(CubeError):
    """Input data (an AnnData, a count table, a sample sheet) cannot be imported as a cube."""


class ResultsError(NbdaskError, ValueError):
    """A results store is missing, incomplete, or would be overwritten."""


class OptionError(NbdaskError, ValueError):
    """An option has a value nbdask does not know."""


class StoreError(NbdaskError, OSError):
    """A store cannot be reached, read or written."""


class MissingStoreError(StoreError, FileNotFoundError):
    """No Zarr store at the given path or URL."""


class NbdaskWarning(UserWarning):
    """Something suspicious that does not stop the run."""
