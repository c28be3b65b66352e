"""Training stages: one `run(recipe)` per stage, sharing losses and checkpoints."""
