"""Networks: the learned augmenter A_θ, predefined augmentations and classifier backbones.

Nothing here imports `pipelines`.
"""

from models.augmenter import Augmenter, apply_transform, magnitudes, parse_transforms
from models.backbones import create_backbone
from models.predefined import random_flip, random_translate

__all__ = ["Augmenter", "apply_transform", "create_backbone", "magnitudes", "parse_transforms",
           "random_flip", "random_translate"]
