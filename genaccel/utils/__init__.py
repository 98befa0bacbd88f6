"""Small shared utilities (atomic file writes, config loading)."""
