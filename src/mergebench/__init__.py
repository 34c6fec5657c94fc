"""mergebench: align, merge and repair independently trained classifiers, and reproduce the papers' tables."""

__version__ = "0.1.0"
