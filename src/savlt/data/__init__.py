"""Data sets on disk: discovery, decoding, splits, few-shot draws, transforms, synthetic data."""
