"""One scenario: the plan (scene, ego motion, who moves where) and the per-frame render.

Ego: drives along +x in the right lane at a cruise speed; in an anomaly scenario it
brakes to stop some metres before the anomaly, as the generator's behaviour agent does.
Visibility: a lead van drives ahead of the ego in its lane and hides the anomaly (it is
taller than the anomaly and wide enough to cover it for every sensor set) until frame
`first_visible`, when it has moved to the other lane; the anomaly is also beyond the
100 m range early on in long scenarios. So an anomaly scenario has anomaly voxels in
most of its frames but not in the first, while `anomaly_is_alive` stays True throughout.
Normal scenarios get the same traffic (a lead van half of the time) and no anomaly.

Sudden braking (AnoVox's temporal anomaly): the lead van stays in the ego lane at the same
gap as in normal traffic and, from a frame `onset` on, brakes hard to a stop; during the
braking interval its primitives carry tag 100 (the generator's `anomaly` tag), before and
after it its own vehicle tag. The ego keeps cruising for a short reaction time, then brakes
to stop a few metres behind it. One sweep shows a van ahead as in any normal scenario;
only the motion over several sweeps tells the braking one apart.
"""

from __future__ import annotations

import dataclasses
import math
import uuid
from dataclasses import dataclass

import numpy as np

from sparse_ad.synth import scene as sc
from sparse_ad.synth.anomalies import Anomaly, make_anomaly
from sparse_ad.synth.raycast import cast, surface_points, sweep_points
from sparse_ad.synth.sensors import (
    CAMERA_MAX_RANGE,
    LIDAR_ARGS,
    LIDAR_DROPOUT,
    TICK_S,
    SensorSet,
    camera_directions,
    lidar_directions,
)
from sparse_ad.tags import GENERIC_ANOMALY
from sparse_ad.voxelize import voxelize

FRAME_STRIDE = 2
"""Simulator ticks between recorded frames (0.2 s): frame ids go start, start+2, ..."""
MARGIN = 110.0
"""Scene built this far (m) behind the first and beyond the last ego position."""
ANOMALY_HALF_WIDTH = 0.9
"""Anomalies stay within +-0.9 m of the ego lane's centre (inside the lead van's shadow)."""
KINDS = ("static", "braking")
"""Anomaly scenario kinds: an object on the road, or the lead vehicle braking suddenly."""
BRAKING_TAG = GENERIC_ANOMALY
EGO_FRONT = 2.4
"""Ego centre to front bumper (m)."""
VAN_BLUEPRINT = "vehicle.carlamotors.carlacola"


@dataclass
class Motion:
    """Ego kinematics along x: cruise at v0, then (optionally) brake to a stop at x_stop."""

    v0: float
    x_brake: float = math.inf   # where braking starts
    decel: float = 0.0

    def at(self, t: float) -> tuple[float, float]:
        """(x, speed) at time t."""
        t_b = self.x_brake / self.v0
        if t <= t_b:
            return self.v0 * t, self.v0
        tau = min(t - t_b, self.v0 / self.decel)
        return self.x_brake + self.v0 * tau - 0.5 * self.decel * tau * tau, self.v0 - self.decel * tau


@dataclass
class Plan:
    index: int
    scenario_id: str
    frame_ids: list[int]
    times: np.ndarray            # (F,) s
    ego_x: np.ndarray            # (F,) m, scene frame
    speed: np.ndarray            # (F,) m/s
    braking: np.ndarray          # (F,) bool
    throttle: float
    street: sc.Street
    prims: sc.Prims
    offsets: np.ndarray          # (F, G, 3) per-frame group offsets
    anomaly: Anomaly | None
    anomaly_pos: np.ndarray | None  # (F, 3) base centre per frame, scene frame
    anomaly_motion: np.ndarray | None  # (F, 2) speed (m/s) and acceleration (m/s^2) along +x
    first_visible: int
    heading: float               # scene → world rotation about z (rad)
    world_shift: np.ndarray      # (3,) scene → world translation
    vehicle_id: int
    anomaly_id: int
    frame_seed: np.random.SeedSequence
    kind: str = "normal"         # "normal" or one of KINDS
    lead_group: int = -1         # the lead van's motion group (-1: no lead van)
    anomaly_frames: np.ndarray | None = None   # braking: frames (F,) bool in which the lead van is tagged 100

    @property
    def num_frames(self) -> int:
        return len(self.frame_ids)

    def ego_position(self, k: int) -> np.ndarray:
        return np.array([self.ego_x[k], self.street.ego_lane_y, 0.0])


def plan_scenario(seq: np.random.SeedSequence, index: int, frames: int, anomalous: bool,
                  kind: str = "static") -> Plan:
    """Everything about one scenario except the rendering, drawn from `seq` alone. `kind`
    (one of KINDS) says which anomaly an anomalous scenario gets."""
    if anomalous and kind not in KINDS:
        raise ValueError(f"anomaly kind must be one of {KINDS}, got {kind!r}")
    braking = anomalous and kind == "braking"
    rng = np.random.default_rng(seq)
    scenario_id = str(uuid.UUID(bytes=rng.bytes(16), version=4))
    start = int(rng.integers(1000, 60000))
    frame_ids = [start + FRAME_STRIDE * k for k in range(frames)]
    times = np.arange(frames) * FRAME_STRIDE * TICK_S
    v0 = rng.uniform(6.0, 11.0)
    first_visible = min(max(1, int(round(frames * rng.uniform(0.1, 0.35)))), frames - 1)
    has_lead = anomalous or rng.random() < 0.5
    lead = dict(length=rng.uniform(4.8, 6.5), width=rng.uniform(2.0, 2.4), height=rng.uniform(2.4, 3.0),
                gap=rng.uniform(9.0, 14.0))
    lane_change = first_visible if (anomalous or rng.random() < 0.6) else frames

    motion, anomaly, anomaly_x, lateral = Motion(v0), None, None, 0.0
    if braking:
        lane_change = frames
        onset, van, motion = _plan_braking(rng, v0, times, lead)
        first_visible = onset
    elif anomalous:
        anomaly, anomaly_x, lateral, motion = _place_anomaly(rng, v0, v0 * times, first_visible, lead)
    state = [motion.at(t) for t in times]
    ego_x, speed = np.array([x for x, _ in state]), np.array([v for _, v in state])

    x_lo, x_hi = -MARGIN, max(ego_x[-1], anomaly_x or 0.0) + MARGIN
    b = sc.SceneBuilder()
    street = sc.build_street(rng, b, x_lo, x_hi)
    paths: dict[int, np.ndarray] = {}   # motion group → (F, 3) offsets
    g = b.new_group()
    b.add_parts(sc.ego_parts(), (0.0, 0.0, 0.0), 0.0, sc.EGO, 0.6, g)
    paths[g] = np.stack([ego_x, np.full(frames, street.ego_lane_y), np.zeros(frames)], axis=1)
    lead_path, lead_group, lead_refl = None, -1, 0.0
    if has_lead:
        lead_path = _lead_path(ego_x, times, v0, lead, street, lane_change)
        if braking:   # the van's own motion, not a fixed gap to the ego
            lead_path[:, 0] = lead["gap"] + lead["length"] / 2 + np.array([van.at(t)[0] for t in times])
        lead_group = g = b.new_group()
        lead_tag = sc.TRUCK if rng.random() < 0.5 else sc.CAR
        lead_refl = rng.uniform(0.4, 0.8)
        b.add_parts(sc.van_parts(lead["length"], lead["width"], lead["height"]), (0.0, 0.0, 0.0), 0.0,
                    lead_tag, lead_refl, g)
        paths[g] = lead_path
    anomaly_pos = anomaly_motion = anomaly_frames = None
    if braking:
        speed_van = np.array([van.at(t)[1] for t in times])
        anomaly_frames = (speed_van > 1e-6) & (times >= van.x_brake / v0)
        anomaly_pos = lead_path.copy()
        anomaly_motion = np.stack([speed_van, np.where(anomaly_frames, -van.decel, 0.0)], axis=1)
        anomaly = Anomaly("braking_vehicle", "anomaly", BRAKING_TAG,
                          sc.van_parts(lead["length"], lead["width"], lead["height"]),
                          (lead["length"], lead["width"], lead["height"]), lead_refl, VAN_BLUEPRINT)
    elif anomalous:
        anomaly_pos = np.tile([anomaly_x, street.ego_lane_y + lateral, 0.0], (frames, 1))
        anomaly_motion = np.zeros((frames, 2))
        b.add_parts(anomaly.parts, anomaly_pos[0], 0.0, anomaly.tag, anomaly.refl)
    for g, vel in sc.add_pedestrians(rng, b, street, x_lo, x_hi):
        paths[g] = times[:, None] * vel[None, :]
    paths.update(_add_oncoming(rng, b, street, times, x_lo, x_hi, lead_path, lead["length"]))

    prims = b.build()
    offsets = np.zeros((frames, b.n_groups, 3))
    for g, path in paths.items():
        offsets[:, g] = path
    vehicle_id = int(rng.integers(100, 400))
    return Plan(
        index=index, scenario_id=scenario_id, frame_ids=frame_ids, times=times, ego_x=ego_x, speed=speed,
        braking=times > motion.x_brake / v0, throttle=float(rng.uniform(0.35, 0.55)), street=street, prims=prims,
        offsets=offsets, anomaly=anomaly, anomaly_pos=anomaly_pos, first_visible=first_visible if anomalous else 0,
        heading=float(rng.uniform(0, 2 * math.pi)),
        world_shift=np.array([rng.uniform(-200, 200), rng.uniform(-200, 200), rng.uniform(0.0, 0.3)]),
        vehicle_id=vehicle_id, anomaly_id=vehicle_id + int(rng.integers(1, 300)),
        frame_seed=np.random.SeedSequence(seq.entropy, spawn_key=seq.spawn_key + (1,)),
        anomaly_motion=anomaly_motion, kind=kind if anomalous else "normal",
        lead_group=lead_group, anomaly_frames=anomaly_frames)


def _plan_braking(rng, v0: float, times: np.ndarray, lead: dict) -> tuple[int, Motion, Motion]:
    """The braking frame `onset`, the van's motion (from its start, cruising at v0, braking at
    4-7 m/s^2 from just before frame `onset`) and the ego's (cruising, reacting 0.1-0.4 s
    later, braking to stop 2-4 m behind the van; never closer than 1 m on the way).

    The onset is at least two frames in (when the scenario has them), so that earlier sweeps
    of the cruising van exist for every braking frame."""
    frames = len(times)
    onset = min(max(2, int(round(frames * rng.uniform(0.2, 0.45)))), frames - 1)
    t_brake = max(times[onset] - rng.uniform(0.0, 0.95) * FRAME_STRIDE * TICK_S, 0.0)
    decel = rng.uniform(4.0, 7.0)
    van = Motion(v0, v0 * t_brake, decel)
    reaction, stop_gap = rng.uniform(0.1, 0.4), rng.uniform(2.0, 4.0)
    van_stop_rear = lead["gap"] + van.x_brake + v0 * v0 / (2 * decel)
    x_brake = v0 * (t_brake + reaction)
    ego = Motion(v0, x_brake, v0 * v0 / (2 * max(van_stop_rear - stop_gap - EGO_FRONT - x_brake, 1.0)))
    fine = np.linspace(0.0, t_brake + reaction + v0 / min(decel, ego.decel) + 1.0, 400)
    while ego.decel < 12.0 and min(lead["gap"] + van.at(t)[0] - ego.at(t)[0] - EGO_FRONT for t in fine) < 1.0:
        ego = dataclasses.replace(ego, decel=ego.decel * 1.1)   # harder braking until it never gets too close
    return onset, van, ego


def _place_anomaly(rng, v0: float, cruise_x: np.ndarray, first_visible: int, lead: dict):
    """The anomaly, the x of its centre, its lateral offset in the ego lane, and the ego's
    motion. The anomaly would be 8-25 m ahead at the end at cruise speed (but starts at most
    60-95 m ahead, so a long scenario ends with the ego waiting in front of it), and is never
    closer than 3 m to the lead van while the van is in the lane. The ego brakes to stop
    8-12 m short of it."""
    anomaly = make_anomaly(rng, max_height=lead["height"] - 0.3, max_half_width=ANOMALY_HALF_WIDTH)
    near = min(cruise_x[-1] + rng.uniform(8.0, 25.0), rng.uniform(60.0, 95.0))   # long runs: stop and wait
    if first_visible > 0:
        near = max(near, cruise_x[first_visible - 1] + lead["gap"] + lead["length"] + 3.0)
    x_stop = near - rng.uniform(6.0, 10.0) - EGO_FRONT
    decel = rng.uniform(2.5, 4.0)
    x_brake = x_stop - v0 * v0 / (2 * decel)
    if x_brake < 0:
        x_brake, decel = 0.0, v0 * v0 / (2 * max(x_stop, 1.0))
    lateral = rng.uniform(-1.0, 1.0) * max(ANOMALY_HALF_WIDTH - anomaly.size[1] / 2, 0.0)
    return anomaly, near + anomaly.size[0] / 2, lateral, Motion(v0, x_brake, decel)


def _add_oncoming(rng, b: sc.SceneBuilder, street: sc.Street, times, x_lo, x_hi, lead_path, lead_length):
    """2-6 cars driving towards the ego in the left lane, minus any that would run into the
    lead van once it has changed lanes. Returns their motion groups' paths."""
    paths = {}
    for _ in range(int(rng.integers(2, 7))):
        v = rng.uniform(7.0, 13.0)
        x0 = rng.uniform(x_lo + 20.0, x_hi + v * times[-1])
        path = np.stack([x0 - v * times, np.full(len(times), street.left_lane_y), np.zeros(len(times))], axis=1)
        if lead_path is not None and np.any((np.abs(path[:, 0] - lead_path[:, 0]) < lead_length / 2 + 8.0)
                                            & (lead_path[:, 1] > 0)):
            continue
        g = b.new_group()
        length = rng.uniform(3.9, 4.9)
        b.add_parts(sc.car_parts(length, rng.uniform(1.75, 1.95), rng.uniform(1.4, 1.65)), (0.0, 0.0, 0.0),
                    math.pi, sc.CAR, rng.uniform(0.4, 0.8), g)
        paths[g] = path
    return paths


def _lead_path(ego_x, times, v0, lead, street: sc.Street, lane_change: int) -> np.ndarray:
    """Centre of the lead van per frame: in the ego lane a fixed gap ahead until
    `lane_change`, then in the left lane, driving on at v0."""
    f = len(times)
    x = ego_x + lead["gap"] + lead["length"] / 2
    y = np.full(f, street.ego_lane_y)
    if lane_change < f:
        k = max(lane_change - 1, 0)
        after = np.arange(f) >= lane_change
        x = np.where(after, x[k] + v0 * (times - times[k]), x)
        y = np.where(after, street.left_lane_y, y)
    return np.stack([x, y, np.zeros(f)], axis=1)


@dataclass
class SetOutput:
    """What one sensor set produces in one frame (sensor frame, float32)."""

    lidar: np.ndarray        # (N, 4) x, y, z, intensity
    semantic: np.ndarray     # (M, 4) x, y, z, tag
    camera: np.ndarray       # (K, 4) x, y, z, tag (not saved; feeds the ground truth)


@dataclass
class FrameOutput:
    sets: list[SetOutput]
    gt: np.ndarray           # (V, 4) uint16 VOXEL_GRID rows


def render_frame(plan: Plan, k: int, sets: tuple[SensorSet, ...], points_per_sweep: int) -> FrameOutput:
    rng = np.random.default_rng(np.random.SeedSequence(plan.frame_seed.entropy,
                                                       spawn_key=plan.frame_seed.spawn_key + (k,)))
    prims = plan.prims
    if plan.anomaly_frames is not None and plan.anomaly_frames[k]:   # the braking van: tag 100 now
        tag = np.where(prims.group == plan.lead_group, np.int32(plan.anomaly.tag), prims.tag).astype(np.int32)
        prims = dataclasses.replace(prims, tag=tag)
    centers = prims.center + plan.offsets[k][prims.group]
    ego = plan.ego_position(k)
    cam_dirs = camera_directions()
    outputs = []
    for s in sets:
        origin = ego + s.origin
        dirs = lidar_directions(points_per_sweep, rng.random())
        t, tag, cos, refl = cast(origin, s.axes, dirs, LIDAR_ARGS["range"], prims, centers, plan.street.ground)
        n_hits = int(np.isfinite(t).sum())
        semantic, lidar = sweep_points(t, tag, cos, refl, dirs, rng.normal(0.0, LIDAR_ARGS["noise_stddev"], n_hits),
                                       rng.random(n_hits), LIDAR_ARGS["range"], LIDAR_DROPOUT)
        ct, ctag, _, _ = cast(origin, s.axes, cam_dirs, CAMERA_MAX_RANGE, prims, centers, plan.street.ground)
        outputs.append(SetOutput(lidar, semantic, surface_points(ct, ctag, cam_dirs)))
    return FrameOutput(outputs, ground_truth(outputs, sets))


def ground_truth(outputs: list[SetOutput], sets: tuple[SensorSet, ...]) -> np.ndarray:
    """The generator's merge: every set's semantic LiDAR and camera points, each moved to
    the grid frame by its set's transform (from the float32 values as stored), voxelized
    with the AnoVox label rule; rows (ix, iy, iz, tag) uint16 in ascending key order."""
    xyz, tags = [], []
    for out, s in zip(outputs, sets, strict=True):
        for pts in (out.semantic, out.camera):
            xyz.append(s.transform.apply(pts))
            tags.append(pts[:, 3].astype(np.int32))
    vox = voxelize(np.concatenate(xyz), labels=np.concatenate(tags))
    if vox.n_outside or vox.n_nonfinite:   # the scene is built to fit the grid: a bug if not
        raise RuntimeError(f"synthetic points outside the grid ({vox.n_outside}) or not finite ({vox.n_nonfinite})")
    return np.concatenate([vox.coords, vox.labels[:, None]], axis=1).astype(np.uint16)
