"""ACTION and ANOMALY csv records (`key ; value`, values printed as Python literals) and
the sensor poses they carry.

Poses follow CARLA: `lidar transformation matrix` is world-from-sensor in the left-handed
UE frame (x forward, y right, z up), so a stored point p (y already negated, right-handed)
goes to the world as  M @ diag(1, -1, 1, 1) @ [p, 1]. As in the generator, the matrix is
that of the last LIDAR spawned (the last sensor set), and the camera's is the same set's.
"""

from __future__ import annotations

import numpy as np

from sparse_ad.synth.scenario import Plan
from sparse_ad.synth.scene import rot_z
from sparse_ad.synth.sensors import SensorSet

FLIP_Y = np.diag([1.0, -1.0, 1.0])
EGO_TYPE_ID = "vehicle.lincoln.mkz_2020"


def _f(v) -> float:
    """A float as CARLA hands it over (float32, printed by Python)."""
    return float(np.float32(v))


def world_from_scene(plan: Plan) -> tuple[np.ndarray, np.ndarray]:
    """Right-handed scene → world rotation and translation."""
    return rot_z(plan.heading), plan.world_shift


def sensor_matrix(plan: Plan, k: int, s: SensorSet) -> np.ndarray:
    """(4, 4) world-from-sensor, left-handed (CARLA's `Transform.get_matrix()`)."""
    r_w, t_w = world_from_scene(plan)
    rot = r_w @ s.axes
    pos = r_w @ (plan.ego_position(k) + s.origin) + t_w
    m = np.eye(4)
    m[:3, :3] = FLIP_Y @ rot @ FLIP_Y
    m[:3, 3] = FLIP_Y @ pos
    return m


def _matrix_literal(m: np.ndarray) -> list:
    return [[_f(v) for v in row] for row in m]


def action_record(plan: Plan, k: int, sets: tuple[SensorSet, ...]) -> dict:
    m = sensor_matrix(plan, k, sets[-1])
    inv = np.linalg.inv(m)
    v = float(plan.speed[k])
    stopped = v < 1e-3
    braking = bool(plan.braking[k])
    return {
        "frame_id": plan.frame_ids[k],
        "scenario_id": plan.scenario_id,
        "vehicle_id": plan.vehicle_id,
        "vehicle_type_id": EGO_TYPE_ID,
        "speed": _f(3.6 * v),
        "throttle": 0.0 if braking else _f(plan.throttle),
        "steer": 0.0,
        "brake": (1.0 if stopped else 0.5) if braking else 0.0,
        "hand_brake": False,
        "reverse": False,
        "gear": 1 if v < 4.0 else (2 if v < 8.0 else 3),
        "max_rpm": 6000.0,
        "final_ratio": 4.0,
        "mass": 1845.0,
        "center_of_mass": (0.0, 0.0, -0.3),
        "FR_wheel max steer angle": 70.0,
        "FL_wheel max steer angle": 70.0,
        "BR_wheel max steer angle": 0.0,
        "BL_wheel max steer angle": 0.0,
        "FR_wheel tire friction": 3.5,
        "FL_wheel tire friction": 3.5,
        "BR_wheel tire friction": 3.5,
        "BL_wheel tire friction": 3.5,
        "camera transformation matrix": _matrix_literal(m),
        "camera inverse transformation matrix": _matrix_literal(inv),
        "lidar transformation matrix": _matrix_literal(m),
        "lidar inverse transformation matrix": _matrix_literal(inv),
    }


def anomaly_record(plan: Plan, k: int) -> dict:
    """The anomaly actor's state in world coordinates (CARLA's frame). `anomaly_is_alive` is
    True in every frame: the actor exists whether or not any sensor sees it (and the braking
    vehicle exists before and after it brakes)."""
    a = plan.anomaly
    r_w, t_w = world_from_scene(plan)
    loc = FLIP_Y @ (r_w @ plan.anomaly_pos[k] + t_w)
    speed, accel = plan.anomaly_motion[k]
    forward = FLIP_Y @ r_w @ np.array([1.0, 0.0, 0.0])
    return {
        "frame_id": plan.frame_ids[k],
        "scenario_id": plan.scenario_id,
        "anomaly_id": plan.anomaly_id,
        "anomaly_type_id": a.type_id,
        "anomaly_is_alive": True,
        "semantic_tags": [a.tag],
        "location": tuple(_f(v) for v in loc),
        "velocity": tuple(_f(v) + 0.0 for v in speed * forward),
        "acceleration": tuple(_f(v) + 0.0 for v in accel * forward),
        "role_name": "anomaly",
        "size": tuple(round(v, 3) for v in a.size),
        "shape": a.name,
    }


def format_record(record: dict) -> str:
    """One `key ; value` line per entry, exactly as the generator writes them."""
    return "".join(f"{key} ; {value}\n" for key, value in record.items())
