"""Moving disk data into and out of the vault: parallel, bounded in memory."""
