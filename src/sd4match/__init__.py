"""sd4match: semantic correspondence from Stable Diffusion features with learned prompts."""

from sd4match.errors import Sd4MatchError

__version__ = "0.1.0"

__all__ = ["Sd4MatchError", "__version__"]
