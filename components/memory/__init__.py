"""The correction memory: accepted corrections served at once."""
