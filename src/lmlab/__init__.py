"""lmlab: adapt, evaluate, watermark and probe pretrained language models on one CPU machine."""

from lmlab.errors import LmlabError

__version__ = "0.1.0"
__all__ = ["LmlabError", "__version__"]
