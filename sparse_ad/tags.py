"""AnoVox semantic tags and the default label sets: the one place these numbers live.

Sources: the AnoVox generator's tag table (CARLA 0.9.14 plus the benchmark's anomaly
classes). The anomaly and ignore sets are configuration (`LabelConfig` in config.py); the
constants below are only their defaults.
"""

TAG_NAMES = {
    0: "unlabeled", 1: "road", 2: "sidewalk", 3: "building", 4: "wall", 5: "fence",
    6: "pole", 7: "traffic light", 8: "traffic sign", 9: "vegetation", 10: "terrain",
    11: "sky", 12: "pedestrian", 13: "rider", 14: "car", 15: "truck", 16: "bus",
    17: "train", 18: "motorcycle", 19: "bicycle", 20: "static", 21: "dynamic",
    22: "other", 23: "water", 24: "road line", 25: "ground", 26: "bridge",
    27: "rail track", 28: "guard rail",
    29: "home", 30: "animal", 31: "nature", 32: "special", 33: "airplane", 34: "falling",
    100: "anomaly",
    112: "agent pedestrian", 113: "agent rider", 114: "agent car", 115: "agent truck",
    116: "agent bus", 118: "agent motorcycle", 119: "agent bicycle",
    214: "ego vehicle",
}

GENERIC_ANOMALY = 100
"""The generator's own `anomaly` tag, e.g. a lead vehicle during a sudden-braking interval."""
ROAD = 1
SIDEWALK = 2
ROAD_LINE = 24
"""A voxel holding any road-line point is labelled road line (AnoVox label rule, step 4)."""
TERRAIN = 10
GROUND = 25
FLAT_TAGS = (ROAD, SIDEWALK, TERRAIN, ROAD_LINE, GROUND)
"""Surfaces that look alike a few metres on: `check-alignment` leaves them out of the sweep check."""

DEFAULT_ANOMALY_TAGS = (29, 30, 31, 32, 33, 34, 100)
DEFAULT_IGNORE_TAGS = (112, 113, 114, 115, 116, 117, 118, 119, 214)

MAX_TAG = 65535
"""Tags are stored as uint16 in VOXEL_GRID files; lookup tables cover 0..MAX_TAG."""

CITYSCAPES_COLORS = {
    (0, 0, 0): 0, (128, 64, 128): 1, (244, 35, 232): 2, (70, 70, 70): 3, (102, 102, 156): 4,
    (190, 153, 153): 5, (153, 153, 153): 6, (250, 170, 30): 7, (220, 220, 0): 8,
    (107, 142, 35): 9, (152, 251, 152): 10, (70, 130, 180): 11, (220, 20, 60): 12,
    (255, 0, 0): 13, (0, 0, 142): 14, (0, 0, 70): 15, (0, 60, 100): 16, (0, 80, 100): 17,
    (0, 0, 230): 18, (119, 11, 32): 19, (110, 190, 160): 20, (170, 120, 50): 21,
    (55, 90, 80): 22, (45, 60, 150): 23, (157, 234, 50): 24, (81, 0, 81): 25,
    (150, 100, 100): 26, (230, 150, 140): 27, (180, 165, 180): 28,
    (245, 0, 0): 29,
}
"""CARLA's Cityscapes palette → tag, for older benchmark copies that keep semantic point
clouds as `.pcd` with the tag encoded as a colour. The anomaly colour (245, 0, 0) maps to
29, the tag the released samples carry."""
