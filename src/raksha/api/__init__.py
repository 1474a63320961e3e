"""The REST API v1 (the seed's resources and verbs, plus what users need beyond them)."""
