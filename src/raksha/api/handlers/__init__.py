"""One module per resource: its handlers, with its JSON schemas beside it in :mod:`raksha.api.schemas`."""
