"""sdft: fine-tune Stable Diffusion with DVC-versioned stages, a promotion gate and an MLflow registry."""

__version__ = "0.1.0"
