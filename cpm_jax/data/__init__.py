"""Data: TFDS builders for the demo and user corpora, and the Grain LM pipeline."""
