"""tasks: Prefect tasks, thin wrappers around atkd_core stages (caching, retries, tracking, progress)."""
