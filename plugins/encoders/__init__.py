"""Built-in plugin package."""
