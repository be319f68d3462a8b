"""Data pipelines: DALI (GPU or CPU) and torchvision loaders over the ImageFolder layout, tiles of
large images, and the up-front scan of every file.

Nothing here imports `models`; loaders hand over plain [0, 1] float images. See pipelines/README.md.
"""

from pipelines.dali import DaliLoader, dali_import_error
from pipelines.folder import DataError, FolderIndex, find_splits, scan_folder
from pipelines.scan import scan_split, scan_splits
from pipelines.tiles import DaliTileLoader, TorchTileLoader
from pipelines.torch_loader import TorchLoader

__all__ = ["DaliLoader", "DaliTileLoader", "DataError", "FolderIndex", "TorchLoader", "TorchTileLoader",
           "dali_import_error", "find_splits", "scan_folder", "scan_split", "scan_splits"]
