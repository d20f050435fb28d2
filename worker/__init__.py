"""mqfed worker package."""
