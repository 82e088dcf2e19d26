"""groundcam: where does a vision-language model find this text in the image?"""

from groundcam.api import builtin_models, families, load, methods
from groundcam.eval.pointing import PointingResult, pointing_game
from groundcam.explainer import Explainer
from groundcam.explanation import Explanation

__all__ = [
    "Explainer",
    "Explanation",
    "PointingResult",
    "builtin_models",
    "families",
    "load",
    "methods",
    "pointing_game",
]
