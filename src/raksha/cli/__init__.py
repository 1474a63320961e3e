"""The ``raksha`` command line."""
