"""The package version (its own module so that modules low in the layering can read it)."""

__version__ = "0.1.0"
