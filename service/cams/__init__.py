"""CAM methods. Importing this package registers every method module below."""

from service.cams import gradient  # noqa: F401  (registers its methods)
from service.cams.base import CAMMethod, MethodParam, get_method, method_names, normalize

__all__ = ["CAMMethod", "MethodParam", "get_method", "method_names", "normalize"]
