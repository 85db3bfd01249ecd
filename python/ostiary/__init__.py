"""Ostiary: an access gateway for machines.

The package is the control plane (Trio); the data path lives in the Rust extension ``ostiary._core``.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("ostiary")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0+source"

__all__ = ["__version__"]
