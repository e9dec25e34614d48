"""Corpus readers, cleaning, deduplication, and the data stage."""
