"""Putting a model to work: the continuous-batching engine and the OpenAI-compatible server."""
