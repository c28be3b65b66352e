"""Use a model: generate, chat, compare."""
