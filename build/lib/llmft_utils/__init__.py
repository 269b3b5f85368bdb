"""Helpers for the CD-vs-ICL NLI study: data, patterns, models, ICL scoring, probes, results, pipeline."""
__version__ = "0.1.0"
