"""codetune's version: one place, read by the package, the CLI's --version and every output marker."""

__version__ = "0.1.0"
