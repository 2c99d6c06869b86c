"""Checkpoint loaders: config from the checkpoint's metadata, weights by a name map."""
