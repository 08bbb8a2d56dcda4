"""Anomalous objects: composites of boxes, ellipsoids and cylinders, 0.3 m to 3 m.

Each category carries the AnoVox tag of its class (29 home ... 34 falling, 100 anomaly)
and a name in the style of the generator's blueprints (`static.prop.o_<name>_<category>`).
Shapes are drawn at unit size and scaled uniformly to the drawn size (largest extent).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from sparse_ad.synth.raycast import BOX, CYLINDER, ELLIPSOID
from sparse_ad.synth.scene import Part, rot_x, rot_y, rot_z

CATEGORY_TAGS = {"home": 29, "animal": 30, "nature": 31, "special": 32, "airplane": 33, "falling": 34,
                 "anomaly": 100}
MIN_SIZE, MAX_SIZE = 0.3, 3.0


@dataclass
class Anomaly:
    name: str                 # e.g. "fridge"
    category: str             # e.g. "home"
    tag: int
    parts: list[Part]         # object frame: resting on z = 0, centred in x and y
    size: tuple               # (dx, dy, dz) metres, axis-aligned in the object frame
    refl: float
    blueprint: str = ""       # an actor's own blueprint (the braking vehicle's); "" = a static prop

    @property
    def type_id(self) -> str:
        return self.blueprint or f"static.prop.o_{self.name}_{self.category}"


def _legs(xs, ys, top, r):
    return [Part(CYLINDER, (x, y, top / 2), (r, r, top / 2)) for x in xs for y in ys]


def _shape(rng: np.random.Generator, category: str) -> tuple[str, list[Part]]:
    u = rng.uniform
    if category == "home":
        name = rng.choice(["fridge", "mattress", "sofa", "table"])
        if name == "fridge":
            return name, [Part(BOX, (0, 0, 0.9), (0.35, 0.35, 0.9))]
        if name == "mattress":
            return name, [Part(BOX, (0, 0, 0.12), (1.0, 0.7, 0.12))]
        if name == "sofa":
            return name, [Part(BOX, (0, 0, 0.22), (1.0, 0.45, 0.22)), Part(BOX, (0, -0.35, 0.6), (1.0, 0.1, 0.25)),
                          Part(BOX, (-0.95, 0, 0.5), (0.08, 0.45, 0.12)), Part(BOX, (0.95, 0, 0.5), (0.08, 0.45, 0.12))]
        return name, [Part(BOX, (0, 0, 0.74), (0.7, 0.4, 0.03))] + _legs((-0.6, 0.6), (-0.32, 0.32), 0.72, 0.03)
    if category == "animal":
        name = rng.choice(["dog", "deer", "cow"])
        leg = {"dog": 0.35, "deer": 0.8, "cow": 0.7}[name]
        body = {"dog": (0.4, 0.15, 0.15), "deer": (0.55, 0.18, 0.22), "cow": (0.9, 0.35, 0.4)}[name]
        z = leg + body[2] * 0.8
        head = body[2] * 0.7
        parts = [Part(ELLIPSOID, (0, 0, z), body),
                 Part(CYLINDER, (body[0] * 0.95, 0, z + body[2] * 0.9), (head * 0.4, head * 0.4, body[2] * 0.7),
                      rot_y(math.radians(30))),
                 Part(ELLIPSOID, (body[0] * 1.2, 0, z + body[2] * 1.6), (head * 1.1, head * 0.6, head * 0.7))]
        parts += _legs((-0.7 * body[0], 0.7 * body[0]), (-0.6 * body[1], 0.6 * body[1]), leg + 0.1,
                       0.05 + 0.1 * body[1])
        return name, parts
    if category == "nature":
        name = rng.choice(["rock", "log", "stump", "bush"])
        if name == "rock":
            rx, ry, rz = u(0.5, 1.0), u(0.4, 0.9), u(0.3, 0.7)
            return name, [Part(ELLIPSOID, (0, 0, rz * 0.85), (rx, ry, rz))]
        if name == "log":
            r = u(0.08, 0.2)
            return name, [Part(CYLINDER, (0, 0, r), (r, r, 1.0), rot_y(math.pi / 2))]
        if name == "stump":
            return name, [Part(CYLINDER, (0, 0, 0.35), (0.4, 0.4, 0.35))]
        return name, [Part(ELLIPSOID, (dx, dy, 0.4), (0.45, 0.4, 0.4)) for dx, dy in ((0, 0), (0.4, 0.15), (-0.3, 0.2))]
    if category == "special":
        name = rng.choice(["ball", "barrel", "crate", "tire", "cone"])
        if name == "ball":
            return name, [Part(ELLIPSOID, (0, 0, 0.5), (0.5, 0.5, 0.5))]
        if name == "barrel":
            return name, [Part(CYLINDER, (0, 0, 0.45), (0.3, 0.3, 0.45))]
        if name == "crate":
            return name, [Part(BOX, (0, 0, 0.4), (0.5, 0.4, 0.4))]
        if name == "tire":
            return name, [Part(CYLINDER, (0, 0, 0.5), (0.5, 0.5, 0.15), rot_x(math.pi / 2))]
        return name, [Part(CYLINDER, (0, 0, 0.05 + 0.2 * k), (0.3 - 0.07 * k, 0.3 - 0.07 * k, 0.1)) for k in range(4)]
    if category == "airplane":
        return "plane", [Part(CYLINDER, (0, 0, 0.12), (0.1, 0.1, 0.5), rot_y(math.pi / 2)),
                         Part(BOX, (0.05, 0, 0.14), (0.12, 0.5, 0.015)),
                         Part(BOX, (-0.45, 0, 0.28), (0.06, 0.015, 0.14)),
                         Part(BOX, (-0.45, 0, 0.2), (0.05, 0.18, 0.01))]
    if category == "falling":
        name = rng.choice(["fallen_box", "pipe"])
        tilt = rot_x(math.radians(u(10, 40))) @ rot_y(math.radians(u(-30, 30)))
        if name == "fallen_box":
            return name, [Part(BOX, (0, 0, 0), (0.5, 0.35, 0.3), tilt)]
        return name, [Part(CYLINDER, (0, 0, 0), (0.12, 0.12, 0.5), tilt @ rot_y(math.pi / 2))]
    # "anomaly" (100): a hand cart
    wheels = [Part(CYLINDER, (x, y, 0.15), (0.15, 0.15, 0.04), rot_x(math.pi / 2))
              for x in (-0.4, 0.4) for y in (-0.38, 0.38)]
    return "cart", [Part(BOX, (0, 0, 0.45), (0.6, 0.35, 0.25))] + wheels


def _aabb(parts: list[Part]) -> tuple[np.ndarray, np.ndarray]:
    lo = np.min([np.asarray(p.center, np.float64) - p.aabb_half() for p in parts], axis=0)
    hi = np.max([np.asarray(p.center, np.float64) + p.aabb_half() for p in parts], axis=0)
    return lo, hi


def _transform(parts: list[Part], scale: float, rot: np.ndarray, shift) -> list[Part]:
    out = []
    for p in parts:
        local = np.eye(3) if p.rot is None else p.rot
        out.append(Part(p.kind, tuple(rot @ (np.asarray(p.center, np.float64) * scale) + shift),
                        tuple(np.asarray(p.half, np.float64) * scale), rot @ local))
    return out


def make_anomaly(rng: np.random.Generator, max_height: float, max_half_width: float) -> Anomaly:
    """A random anomaly whose largest extent is log-uniform in [0.3, 3] m, turned to a
    random yaw, kept below `max_height` and within +-`max_half_width` across the road
    (turned lengthwise, then shrunk, when it would not fit)."""
    category = str(rng.choice(list(CATEGORY_TAGS)))
    name, parts = _shape(rng, category)
    name = str(name)
    lo, hi = _aabb(parts)
    size = math.exp(rng.uniform(math.log(MIN_SIZE), math.log(MAX_SIZE)))
    scale = size / float((hi - lo).max())
    yaw = rng.uniform(0, 2 * math.pi)
    for attempt in range(3):
        placed = _transform(parts, scale, rot_z(yaw), (0.0, 0.0, 0.0))
        lo, hi = _aabb(placed)
        over = max((hi[2] - lo[2]) / max_height, (hi[1] - lo[1]) / (2 * max_half_width))
        if over <= 1.0:
            break
        if attempt == 0:
            yaw = rng.uniform(-0.15, 0.15)  # lengthwise along the road
        else:
            scale /= over * 1.02
    centre = -0.5 * (lo + hi)
    placed = [Part(p.kind, (p.center[0] + centre[0], p.center[1] + centre[1], p.center[2] - lo[2]), p.half, p.rot)
              for p in placed]
    return Anomaly(name, category, CATEGORY_TAGS[category], placed, tuple(float(v) for v in hi - lo),
                   float(rng.uniform(0.2, 0.8)))
