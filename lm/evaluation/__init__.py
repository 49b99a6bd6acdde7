"""Evaluation: tasks as JSON-lines data, scored by log-likelihood or by generation."""
