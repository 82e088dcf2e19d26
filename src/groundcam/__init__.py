"""groundcam: where does a vision-language model find this text in the image?"""

from groundcam.api import builtin_models, families, load, methods
from groundcam.eval.pointing import PointingResult, pointing_game
from groundcam.explainer import Explainer
from groundcam.explanation import Explanation
from groundcam.video import Video

__all__ = [
    "Explainer",
    "Explanation",
    "PointingResult",
    "Video",
    "builtin_models",
    "families",
    "load",
    "methods",
    "pointing_game",
]
