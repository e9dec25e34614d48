"""The one training loop and the stage recipes built on it."""
