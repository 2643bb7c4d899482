"""Storage forms of optimizer state (codecs) and the choice of form per slot."""

from . import resolve
from .codec import CODECS, Codec, Dense, get_codec

__all__ = ["CODECS", "Codec", "Dense", "get_codec", "resolve"]
