"""The embedded default world: a small, closed set of tasks generated deterministically from a seed.

It exists so a new user can run the whole pipeline on a laptop CPU in minutes, with no download.
"""

from opd.world.generate import build_world
from opd.world.tokenizer import train_tokenizer

__all__ = ["build_world", "train_tokenizer"]
