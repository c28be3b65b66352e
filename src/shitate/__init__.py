"""shitate (仕立て): tailor an open LLM to your own data, on your own machines."""

__version__ = "0.1.0"
