"""Powerplane: multi-host overlay networking for Docker."""

__version__ = "0.1.0"
