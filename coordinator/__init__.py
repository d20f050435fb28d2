"""mqfed coordinator package."""
