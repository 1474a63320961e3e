"""How the API and scheduler reach the workers: an in-process transport now, oslo.messaging next."""
