"""Ways to learn from the user's scribbles: one module each."""
