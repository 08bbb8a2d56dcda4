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

ROAD = 1
SIDEWALK = 2
ROAD_LINE = 24
"""A voxel holding any road-line point is labelled road line (AnoVox label rule, step 4)."""

DEFAULT_ANOMALY_TAGS = (29, 30, 31, 32, 33, 34, 100)
DEFAULT_IGNORE_TAGS = (112, 113, 114, 115, 116, 118, 119, 214)

MAX_TAG = 255
"""Tags are looked up through dense tables of this size; larger tags are rejected."""
