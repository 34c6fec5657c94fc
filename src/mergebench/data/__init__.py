"""Datasets as on-device uint8 tensors, the scenarios that split them, and device batches."""
