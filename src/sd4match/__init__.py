"""sd4match: semantic correspondence from Stable Diffusion features with learned prompts.

The public face, loaded lazily (``import sd4match`` imports no torch; each name loads its
module on first use)::

    import sd4match

    feat = sd4match.load_featurizer("sd-2-1").to("cuda")           # or sd4match.SDFeaturizer.from_pretrained(...)
    prompt = sd4match.make_prompt("single", feat)                     # or sd4match.load_prompt("runs/x/best", feat)
    m = sd4match.Matcher(feat, "runs/x/best")                         # match points on your own pictures
    sd4match.evaluate(feat, sd4match.EvalConfig("spair", "data/SPair-71k"), "runs/eval")
    sd4match.score(records, predictions, protocol="standard")         # PCK of any method's predictions
"""

from __future__ import annotations

import importlib

from sd4match.errors import Sd4MatchError
from sd4match.version import __version__

#: public name -> the module that defines it
_EXPORTS = {
    "SDFeaturizer": "sd4match.features",
    "DinoFeaturizer": "sd4match.features",
    "EffNetFeaturizer": "sd4match.features",
    "Featurizer": "sd4match.features",
    "images_to_tensor": "sd4match.features",
    "load_featurizer": "sd4match.features",
    "make_prompt": "sd4match.prompts",
    "load_prompt": "sd4match.prompts",
    "match_pixels": "sd4match.matching",
    "dense_match": "sd4match.matching",
    "Matcher": "sd4match.usermatch",
    "open_image": "sd4match.usermatch",
    "open_dataset": "sd4match.data",
    "score": "sd4match.metrics",
    "evaluate": "sd4match.evaluate",
    "Trainer": "sd4match.train",
    "EvalConfig": "sd4match.config",
    "MatchConfig": "sd4match.config",
    "TrainConfig": "sd4match.config",
}

__all__ = ["Sd4MatchError", "__version__", *sorted(_EXPORTS)]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'sd4match' has no attribute {name!r}")
    module = importlib.import_module(_EXPORTS[name])
    # `sd4match.evaluate` is the stage module itself, callable as its `evaluate` function
    value = module if module.__name__ == f"sd4match.{name}" else getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
