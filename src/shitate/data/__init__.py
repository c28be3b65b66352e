"""Data stage: read, validate, split and render conversations."""
