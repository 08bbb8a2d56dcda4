"""sparse_ad: voxel-level anomaly segmentation of LiDAR scans on the AnoVox voxel grid."""

__version__ = "0.1.0"

from sparse_ad.errors import ConfigError, SparseADError  # noqa: E402
from sparse_ad.grid import VoxelGrid  # noqa: E402

__all__ = ["ConfigError", "SparseADError", "VoxelGrid", "__version__"]
