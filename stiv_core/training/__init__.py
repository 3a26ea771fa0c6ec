"""Training: config, optimizers, EMA, the recipe, resumable state and progressive init."""
