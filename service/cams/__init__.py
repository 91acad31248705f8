"""CAM methods. Importing this package registers every method module below.

The import order is the order ``GET /methods`` lists them in.
"""

# isort: off
from service.cams import gradient  # noqa: F401  (each module registers its methods)
from service.cams import activation  # noqa: F401
from service.cams import score  # noqa: F401
from service.cams import ablation  # noqa: F401
from service.cams import recipro  # noqa: F401
from service.cams import secondorder  # noqa: F401
from service.cams import fullgrad  # noqa: F401
from service.cams import saliency  # noqa: F401
from service.cams import legrad  # noqa: F401
# isort: on
from service.cams.base import (
    CAMMethod,
    MethodParam,
    get_method,
    method_catalog,
    method_names,
    normalize,
)

__all__ = ["CAMMethod", "MethodParam", "get_method", "method_catalog", "method_names", "normalize"]
