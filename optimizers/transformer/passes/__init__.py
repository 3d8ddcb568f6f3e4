"""Pipeline passes for the transformer techniques (registered on import)."""
