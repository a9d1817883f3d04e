"""umgr: a userspace memory manager for Linux (see README.md)."""
__version__ = "0.1.0"
