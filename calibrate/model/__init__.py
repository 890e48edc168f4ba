"""Models: offline assets, loading with identity, architecture adapters."""
