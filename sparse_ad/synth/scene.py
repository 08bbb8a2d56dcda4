"""Procedural street scenes as arrays of analytic primitives (see `raycast.py`).

The scene frame has the road along +x, y to the left, z up, the ground at z = 0. The ego
drives in the right-hand lane (y = -lane_w / 2). Every primitive belongs to a group; the
scenario gives each group an offset per frame (0 for the static world, the ego's position
for the ego body, a path for the lead vehicle, v * t for walkers and oncoming cars).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from sparse_ad.synth.raycast import BOX, CYLINDER, ELLIPSOID, bounding_radius, ground_params, local_frames

# tags (AnoVox / CARLA 0.9.14)
ROAD, SIDEWALK, BUILDING, WALL, FENCE, POLE, SIGN, VEGETATION = 1, 2, 3, 4, 5, 6, 8, 9
PEDESTRIAN, CAR, TRUCK, EGO = 12, 14, 15, 214
SIDEWALK_HEIGHT = 0.15
SEGMENT = 10.0
"""Long elements (sidewalks) are cut into pieces this long so azimuth culling works."""


def rot_x(a: float) -> np.ndarray:
    c, s = math.cos(a), math.sin(a)
    return np.array([[1, 0, 0], [0, c, -s], [0, s, c]], np.float64)


def rot_y(a: float) -> np.ndarray:
    c, s = math.cos(a), math.sin(a)
    return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]], np.float64)


def rot_z(a: float) -> np.ndarray:
    c, s = math.cos(a), math.sin(a)
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]], np.float64)


@dataclass
class Prims:
    """Structure of arrays, P primitives."""

    kind: np.ndarray     # (P,) int8   BOX / ELLIPSOID / CYLINDER
    center: np.ndarray   # (P, 3) f64  centre at t = 0 (group offset 0)
    rot: np.ndarray      # (P, 3, 3) f64 local → scene
    half: np.ndarray     # (P, 3) f64  half extents (radii; cylinder: r, r, half height)
    tag: np.ndarray      # (P,) int32  semantic tag
    refl: np.ndarray     # (P,) f32    reflectivity in [0, 1]
    group: np.ndarray    # (P,) int32  motion group
    bound: np.ndarray    # (P,) f64    bounding-sphere radius
    to_local: np.ndarray  # (P, 3, 3) f64 diag(1/h) R^T (scene → scaled local)

    def __len__(self) -> int:
        return int(self.kind.shape[0])


@dataclass
class Part:
    """One primitive of a composite object, in the object's frame."""

    kind: int
    center: tuple
    half: tuple
    rot: np.ndarray | None = None

    def aabb_half(self) -> np.ndarray:
        """Half extents of the axis-aligned box around the rotated primitive."""
        r = np.eye(3) if self.rot is None else self.rot
        h = np.asarray(self.half, np.float64)
        if self.kind == BOX:
            return np.abs(r) @ h
        if self.kind == ELLIPSOID:
            return np.sqrt(((r * h[None, :]) ** 2).sum(axis=1))
        axis = r[:, 2]
        return np.abs(axis) * h[2] + h[0] * np.sqrt(np.clip(1.0 - axis ** 2, 0.0, 1.0))


@dataclass
class SceneBuilder:
    kinds: list = field(default_factory=list)
    centers: list = field(default_factory=list)
    rots: list = field(default_factory=list)
    halves: list = field(default_factory=list)
    tags: list = field(default_factory=list)
    refls: list = field(default_factory=list)
    groups: list = field(default_factory=list)
    n_groups: int = 1

    def new_group(self) -> int:
        self.n_groups += 1
        return self.n_groups - 1

    def add(self, kind, center, half, tag, refl, rot=None, group=0) -> None:
        self.kinds.append(kind)
        self.centers.append(np.asarray(center, np.float64))
        self.rots.append(np.eye(3) if rot is None else np.asarray(rot, np.float64))
        self.halves.append(np.maximum(np.asarray(half, np.float64), 1e-3))
        self.tags.append(tag)
        self.refls.append(refl)
        self.groups.append(group)

    def add_parts(self, parts: list[Part], origin, yaw: float, tag: int, refl: float, group: int = 0) -> None:
        """Place a composite object: object frame rotated by `yaw`, then moved to `origin`."""
        r = rot_z(yaw)
        for p in parts:
            local = np.eye(3) if p.rot is None else p.rot
            self.add(p.kind, np.asarray(origin) + r @ np.asarray(p.center, np.float64), p.half, tag, refl,
                     r @ local, group)

    def build(self) -> Prims:
        kind = np.asarray(self.kinds, np.int8)
        half = np.asarray(self.halves, np.float64).reshape(-1, 3)
        return Prims(kind=kind, center=np.asarray(self.centers, np.float64).reshape(-1, 3),
                     rot=np.asarray(self.rots, np.float64).reshape(-1, 3, 3), half=half,
                     tag=np.asarray(self.tags, np.int32), refl=np.asarray(self.refls, np.float32),
                     group=np.asarray(self.groups, np.int32), bound=bounding_radius(kind, half),
                     to_local=local_frames(np.asarray(self.rots, np.float64).reshape(-1, 3, 3), half))


# --- objects ----------------------------------------------------------------------------

def car_parts(length: float, width: float, height: float, clearance: float = 0.3) -> list[Part]:
    """Lower body, cabin, four wheels (axis along y); object frame: x forward, ground z = 0."""
    body_top = clearance + 0.55 * (height - clearance)
    cab_len = 0.5 * length
    wr = 0.33
    parts = [Part(BOX, (0.0, 0.0, (clearance + body_top) / 2), (length / 2, width / 2, (body_top - clearance) / 2)),
             Part(BOX, (-0.05 * length, 0.0, (body_top + height) / 2),
                  (cab_len / 2, 0.45 * width, (height - body_top) / 2))]
    for sx in (-1, 1):
        for sy in (-1, 1):
            parts.append(Part(CYLINDER, (sx * 0.33 * length, sy * (width / 2 - 0.12), wr), (wr, wr, 0.11),
                              rot_x(math.pi / 2)))
    return parts


def van_parts(length: float, width: float, height: float) -> list[Part]:
    """A box van / small truck: one tall body, four wheels."""
    clearance = 0.35
    parts = [Part(BOX, (0.0, 0.0, (clearance + height) / 2), (length / 2, width / 2, (height - clearance) / 2))]
    for sx in (-1, 1):
        for sy in (-1, 1):
            parts.append(Part(CYLINDER, (sx * 0.35 * length, sy * (width / 2 - 0.15), 0.38), (0.38, 0.38, 0.14),
                              rot_x(math.pi / 2)))
    return parts


def ego_parts() -> list[Part]:
    """The ego body (tag 214 in AnoVox): the lowest LiDAR channels and the camera's bottom
    rows see it, as in CARLA."""
    return [Part(BOX, (0.0, 0.0, 0.65), (2.4, 0.95, 0.35)),
            Part(BOX, (-0.2, 0.0, 1.225), (1.0, 0.75, 0.225))]


def pedestrian_parts(height: float) -> list[Part]:
    head_r = 0.11
    body_h = height - 2 * head_r
    return [Part(CYLINDER, (0.0, 0.0, body_h / 2), (0.2, 0.2, body_h / 2)),
            Part(ELLIPSOID, (0.0, 0.0, body_h + head_r), (head_r, head_r, head_r))]


def tree_parts(rng: np.random.Generator) -> list[Part]:
    trunk_h, trunk_r = rng.uniform(2.0, 3.5), rng.uniform(0.12, 0.25)
    crown = (rng.uniform(1.2, 2.6), rng.uniform(1.2, 2.6), rng.uniform(1.3, 2.8))
    return [Part(CYLINDER, (0.0, 0.0, trunk_h / 2), (trunk_r, trunk_r, trunk_h / 2)),
            Part(ELLIPSOID, (0.0, 0.0, trunk_h + 0.7 * crown[2]), crown)]


# --- the street ---------------------------------------------------------------------------

@dataclass
class Street:
    lane_w: float
    left_edge: float          # y of the road's left edge (> 0)
    right_edge: float         # y of the road's right edge (< 0)
    ground: np.ndarray        # ground parameters for the ray caster

    @property
    def ego_lane_y(self) -> float:
        return -self.lane_w / 2

    @property
    def left_lane_y(self) -> float:
        return self.lane_w / 2


STYLES = {
    # building height, length, P(no gap), gap, yard depth, street-tree spacing, sidewalk width (m)
    "urban": dict(height=(6.0, 17.5), length=(10.0, 30.0), no_gap=0.5, gap=(2.0, 10.0), yard=(0.5, 4.0),
                  trees=(10.0, 20.0), sidewalk=(3.0, 4.5)),
    "suburban": dict(height=(3.5, 9.0), length=(8.0, 18.0), no_gap=0.1, gap=(4.0, 16.0), yard=(3.0, 12.0),
                     trees=(8.0, 16.0), sidewalk=(2.0, 3.5)),
    "rural": dict(height=(3.0, 7.0), length=(8.0, 25.0), no_gap=0.0, gap=(15.0, 60.0), yard=(5.0, 25.0),
                  trees=(6.0, 20.0), sidewalk=(1.5, 2.5)),
}
STYLE_P = {"urban": 0.4, "suburban": 0.4, "rural": 0.2}


def build_street(rng: np.random.Generator, b: SceneBuilder, x_lo: float, x_hi: float) -> Street:
    """Road, parking strips with parked cars, sidewalks, trees, poles and signs, yards with
    hedges and fences, buildings, in an urban, suburban or rural style. Static (group 0)."""
    style = STYLES[str(rng.choice(list(STYLE_P), p=list(STYLE_P.values())))]
    lane_w = rng.uniform(3.2, 3.7)
    park = [rng.uniform(2.0, 2.5) if rng.random() < 0.75 else 0.0 for _ in range(2)]  # left, right
    left_edge, right_edge = lane_w + park[0], -(lane_w + park[1])
    street = Street(lane_w, left_edge, right_edge, ground_params(left_edge, right_edge, lane_w, rng.uniform(0, 6)))
    for side, edge, strip in ((1, left_edge, park[0]), (-1, -right_edge, park[1])):
        _side(rng, b, style, side, edge, strip, lane_w, x_lo, x_hi)
    return street


def _along(rng, x_lo, x_hi, gap_lo, gap_hi):
    x = x_lo + rng.uniform(0, gap_hi)
    while x < x_hi:
        yield x
        x += rng.uniform(gap_lo, gap_hi)


def _side(rng, b: SceneBuilder, style: dict, side: int, edge: float, strip: float, lane_w: float,
          x_lo: float, x_hi: float):
    u = rng.uniform
    sw = u(*style["sidewalk"])
    for x0 in np.arange(x_lo, x_hi, SEGMENT):   # sidewalk, cut in segments
        b.add(BOX, (x0 + SEGMENT / 2, side * (edge + sw / 2), SIDEWALK_HEIGHT / 2),
              (SEGMENT / 2, sw / 2, SIDEWALK_HEIGHT / 2), SIDEWALK, 0.3)
    if strip > 0:   # parked cars (tag 14), facing the traffic direction of their side
        x = x_lo + u(0, 6)
        while x < x_hi:
            length = u(3.9, 4.9)
            if rng.random() < 0.7:
                parts = car_parts(length, u(1.75, 1.95), u(1.4, 1.65))
                b.add_parts(parts, (x + length / 2, side * (lane_w + strip / 2), 0.0),
                            0.0 if side < 0 else math.pi, CAR, u(0.4, 0.8))
            x += length + u(0.8, 7.0)
    kerb = side * (edge + 0.5)
    for x in _along(rng, x_lo, x_hi, *style["trees"]):      # street trees
        b.add_parts(tree_parts(rng), (x, kerb + side * u(0.2, 0.8), SIDEWALK_HEIGHT), 0.0, VEGETATION, u(0.4, 0.6))
    for x in _along(rng, x_lo, x_hi, 20.0, 35.0):     # street lights, some signs
        h = u(6.0, 9.0)
        b.add(CYLINDER, (x, kerb, SIDEWALK_HEIGHT + h / 2), (0.1, 0.1, h / 2), POLE, 0.5)
        b.add(BOX, (x, kerb - side * 0.8, SIDEWALK_HEIGHT + h - 0.1), (0.15, 0.8, 0.06), POLE, 0.5)
        if rng.random() < 0.4:
            b.add(BOX, (x + 0.12, kerb, SIDEWALK_HEIGHT + 2.6), (0.03, 0.35, 0.35), SIGN, 0.9)
    front = edge + sw
    x = x_lo + u(-10, 0)
    while x < x_hi:   # yards and buildings
        length = u(*style["length"])
        gap = 0.0 if rng.random() < style["no_gap"] else u(*style["gap"])
        yard, depth, height = u(*style["yard"]), u(8.0, 15.0), u(*style["height"])
        y0 = front + yard
        b.add(BOX, (x + length / 2, side * (y0 + depth / 2), height / 2), (length / 2, depth / 2, height / 2),
              BUILDING, u(0.3, 0.6))
        if rng.random() < 0.3:  # a lower annex
            h2 = u(3.0, max(3.1, height * 0.7))
            l2 = length * u(0.3, 0.6)
            b.add(BOX, (x + l2 / 2, side * (y0 - 1.0 + depth / 2), h2 / 2), (l2 / 2, depth / 2, h2 / 2), BUILDING, 0.4)
        if yard > 2.5:
            r, h = rng.random(), u(0.4, 0.8)
            if r < 0.4:    # hedge
                b.add(BOX, (x + length / 2, side * (front + 0.6), h), (length / 2, 0.4, h), VEGETATION, 0.5)
            elif r < 0.7:  # fence
                b.add(BOX, (x + length / 2, side * (front + 0.3), h), (length / 2, 0.03, h), FENCE, 0.6)
            for _ in range(int(yard // 6) + (rng.random() < 0.5)):   # yard trees
                y = front + u(1.5, max(yard - 1.0, 1.6))
                b.add_parts(tree_parts(rng), (x + u(0, length + gap), side * y, 0.0), 0.0, VEGETATION, 0.5)
        if gap > 3.0 and rng.random() < 0.3:  # a wall across the gap
            b.add(BOX, (x + length + gap / 2, side * (y0 + 0.2), 1.0), (gap / 2, 0.15, 1.0), WALL, 0.4)
        x += length + gap


def add_pedestrians(rng, b: SceneBuilder, street: Street, x_lo: float, x_hi: float) -> list[tuple[int, np.ndarray]]:
    """Walkers on both sidewalks; returns (group, velocity) per walker."""
    moving = []
    for _ in range(int(rng.integers(4, 15))):
        side = 1 if rng.random() < 0.5 else -1
        edge = street.left_edge if side > 0 else -street.right_edge
        g = b.new_group()
        b.add_parts(pedestrian_parts(rng.uniform(1.5, 1.9)),
                    (rng.uniform(x_lo, x_hi), side * (edge + rng.uniform(1.2, 2.0)), SIDEWALK_HEIGHT), 0.0,
                    PEDESTRIAN, rng.uniform(0.3, 0.7), g)
        moving.append((g, np.array([rng.choice([-1.0, 1.0]) * rng.uniform(0.8, 1.6), 0.0, 0.0])))
    return moving
