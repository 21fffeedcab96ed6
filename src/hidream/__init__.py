"""HiDream-O1-Image: a self-hostable engine and service."""

__version__ = "0.1.0"
