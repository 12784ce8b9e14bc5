"""Helpers every layer shares: atomic writes, content hashing, peak memory. No project imports."""
