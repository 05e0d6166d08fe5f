"""prism_convert: the offline toolchain (profile -> compress -> pack) and the `prism` command line."""

from prism_load import __version__  # noqa: F401
