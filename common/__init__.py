"""mqfed common package."""
