"""Training after conversion: uptraining (KD, early exits) and local healing."""

from recursify.training.healing import HealConfig, HealReport, heal

__all__ = ["HealConfig", "HealReport", "heal"]
