"""Entities, state machines and errors. No I/O, imports nothing else of Raksha."""
