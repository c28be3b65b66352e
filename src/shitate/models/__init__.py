"""Models: find, convert and load weights; attach adapters."""
