"""Benchmark tasks: loaders and how each is scored."""
