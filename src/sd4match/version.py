"""The release of sd4match (the package's ``__version__``), and the installed versions of others."""

from __future__ import annotations

from importlib import metadata

__version__ = "0.1.0"


def package_version(name: str) -> str | None:
    """The installed version of a distribution (``torch``, ``diffusers``, ...), None when absent."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None
