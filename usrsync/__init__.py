"""usrsync: verified, atomic sync of USR datasets over SSH."""

__version__ = "0.1.0"
