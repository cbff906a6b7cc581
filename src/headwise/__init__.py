"""headwise."""
