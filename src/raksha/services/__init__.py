"""The service: what the API asks for (jobs, runs, restores), orchestrated over RPC to agents."""
