"""camserve: image classification with Class Activation Map explanations, over HTTP."""

__version__ = "0.1.0"
