"""Training of flow priors and autoencoders (datasets, patches, the loop, evaluation)."""
