"""Neutral core: the types every other package depends on (and nothing else)."""

from .blocks import Rotations, Side, WeightBlock, check_finite, get_rotation, rotation_dims

__all__ = ["Rotations", "Side", "WeightBlock", "check_finite", "get_rotation", "rotation_dims"]
