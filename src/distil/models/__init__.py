"""Models: zoo, loading from folders or factories, layer maps, vocab checks."""
