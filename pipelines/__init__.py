"""Data pipelines: DALI (GPU or CPU) and torchvision loaders over the ImageFolder layout.

Nothing here imports `models`; loaders hand over plain [0, 1] float images.
"""

from pipelines.dali import DaliLoader, dali_import_error
from pipelines.folder import DataError, FolderIndex, find_splits, scan_folder
from pipelines.torch_loader import TorchLoader

__all__ = ["DaliLoader", "DataError", "FolderIndex", "TorchLoader", "dali_import_error", "find_splits", "scan_folder"]
