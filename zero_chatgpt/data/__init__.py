"""Corpus components: source readers (sources, streams), cleaning, deduplication, the built-in corpus,
and the instruction and preference records built from it. The data stage itself is stages/data.py."""
