"""mqfed broker package."""
