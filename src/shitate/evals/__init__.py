"""Evaluation: rule-based rubrics now; metrics and judges build on the same answers."""
