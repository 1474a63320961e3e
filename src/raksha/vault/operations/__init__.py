"""Whole-vault operations: list, verify, prune, gc."""
