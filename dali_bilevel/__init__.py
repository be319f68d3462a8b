"""dali-bilevel: learned data augmentation by online bilevel optimisation (Mounsaveng et al., WACV 2021)."""

__version__ = "0.1.0"
