"""Transports carry control frames and page streams; sessions do not know which one they use."""
