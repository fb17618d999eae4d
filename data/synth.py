"""The synthetic event world: coloured shapes moving over a textured background, seen by a
20 fps colour video camera (the target's input) and by a simulated event camera (the draft's).

A clip is drawn from its ground truth (`sample_scene`) at a high internal frame rate; the
event camera turns the log luminance of those frames into events (`simulate_events`), the
video camera keeps every 1/video_fps s of colour frames. Events carry no colour; the video
does. `synthesize` writes both durations in the DSEC-clip layout (data/dsec.py), with
per-clip ground truth and reference answers (data/captions.py) in each JSON row.

Everything is a function of (seed, clip index): the scene of clip i is the same in every
duration (its 500 ms clip shows the first half of the 1 s clip's motion), and two runs
with the same arguments write byte-identical files.
"""

from __future__ import annotations

import contextlib
import functools
import multiprocessing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from specalign.data import captions
from specalign.data.dsec import duration_seconds, write_image
from specalign.data.events import EVENT_DTYPE, render_event_frames, save_event_clip
from specalign.data.store import split_of
from specalign.data.video import write_video

from specalign.io import write_json

LUMA = np.array([0.299, 0.587, 0.114], np.float32)
COLOR_RGB = {
    "red": (0.90, 0.12, 0.10), "green": (0.15, 0.75, 0.20), "blue": (0.15, 0.30, 0.95),
    "yellow": (0.95, 0.85, 0.15), "purple": (0.60, 0.20, 0.75), "orange": (0.95, 0.55, 0.10),
}
TONE_LEVEL = {"dark": 0.12, "light": 0.85}     # background luminance
TEXTURE_AMPLITUDE = 0.04                        # texture luminance swing around the tone level
MIN_CONTRAST = 0.4                              # |ln(object / background luminance)| of any object
SIZE_RADIUS = {"small": 0.12, "large": 0.2}     # object radius, fraction of the frame height
SPEED_TRAVEL = {"slow": 0.2, "fast": 0.45}      # distance per second, fraction of the axis length
DIRECTION_UNIT = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
LOG_EPS = 1e-3                                  # log(luminance + LOG_EPS): the sensor's log response
CROSSING_EPS = 1e-6                             # tolerance (in thresholds) for exact level crossings


@dataclass(frozen=True)
class WorldConfig:
    """Sensor and simulation settings (conf/synth.yaml has the same keys)."""

    width: int = 64
    height: int = 48
    internal_fps: int = 1000        # frames per second the event camera sees
    video_fps: int = 20
    n_event_frames: int = 5         # EventGPT frames per clip
    threshold: float = 0.2          # contrast threshold, log units
    refractory_us: int = 0
    noise_rate: float = 0.1         # noise events per pixel per second
    max_objects: int = 2
    clips_per_seq: int = 50         # clips per <seq> folder


# ---------------------------------------------------------------------------- scenes

def sample_scene(rng: np.random.Generator, width: int, height: int, max_objects: int = 2,
                 plan_s: float = 1.0) -> dict:
    """Ground truth of one clip (JSON-ready): background and 1..max_objects moving objects.

    Objects have distinct shapes and colours, each colour contrasting with the background;
    they start apart (when 20 draws find room) and stay inside the frame for `plan_s`
    seconds. Positions are pixel coordinates (x right, y down) at t = 0, velocities px/s.
    """
    if not 1 <= max_objects <= captions.MAX_OBJECTS:
        raise ValueError(f"max_objects must be in 1..{captions.MAX_OBJECTS}, got {max_objects}")
    tone, texture = _pick(rng, captions.TONES), _pick(rng, captions.TEXTURES)
    n = int(rng.integers(1, max_objects + 1))
    colors = [c for c in captions.COLORS if contrast(c, tone) >= MIN_CONTRAST]
    shapes = [captions.SHAPES[k] for k in rng.permutation(len(captions.SHAPES))[:n]]
    colors = [colors[k] for k in rng.permutation(len(colors))[:n]]
    objects = []
    for shape, color in zip(shapes, colors):
        for _ in range(20):  # objects start apart when there is room
            obj = _sample_object(rng, shape, color, width, height, plan_s)
            if all(not _overlap(obj, other) for other in objects):
                break
        objects.append(obj)
    background = {"texture": texture, "tone": tone, "period_px": int(rng.integers(6, 13))}
    return {"background": background, "objects": objects}


def _sample_object(rng, shape: str, color: str, width: int, height: int, plan_s: float) -> dict:
    size, direction, speed = (_pick(rng, v) for v in (captions.SIZES, captions.DIRECTIONS, captions.SPEEDS))
    radius = SIZE_RADIUS[size] * height
    unit = np.array(DIRECTION_UNIT[direction])
    extent = np.array([width, height], float)
    speed_px_s = SPEED_TRAVEL[speed] * extent[unit != 0][0]
    travel = unit * speed_px_s * plan_s
    low = radius + 1 - np.minimum(travel, 0)            # keep start and end inside the frame
    high = extent - radius - 1 - np.maximum(travel, 0)
    start = low + rng.random(2) * (high - low)
    return {"shape": shape, "color": color, "size": size, "direction": direction, "speed": speed,
            "radius_px": round(radius, 3), "start_xy": [round(float(v), 3) for v in start],
            "velocity_px_s": [round(float(v), 3) for v in unit * speed_px_s]}


def _overlap(a: dict, b: dict) -> bool:
    gap = np.hypot(*np.subtract(a["start_xy"], b["start_xy"]))
    return bool(gap < a["radius_px"] + b["radius_px"] + 2)


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def contrast(color: str, tone: str) -> float:
    """|ln(object luminance / background luminance)| of a colour on a background tone."""
    return abs(float(np.log(np.dot(COLOR_RGB[color], LUMA) / TONE_LEVEL[tone])))


# ---------------------------------------------------------------------------- rendering

def background_luma(background: dict, width: int, height: int) -> np.ndarray:
    """[H, W] float32 luminance of the static textured background."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5
    p = background["period_px"]
    half = p / 2
    pattern = {
        "striped": (x // half) % 2,
        "checkered": (x // half + y // half) % 2,
        "dotted": ((x % p - half) ** 2 + (y % p - half) ** 2 < (p / 4) ** 2).astype(np.float32),
        "plain": np.full_like(x, 0.5),
    }[background["texture"]]
    return TONE_LEVEL[background["tone"]] + TEXTURE_AMPLITUDE * (2 * pattern - 1)


def coverage(obj: dict, times_s: np.ndarray, width: int, height: int) -> np.ndarray:
    """[T, H, W] float32 fraction of each pixel the object covers at each time (anti-aliased)."""
    times = np.asarray(times_s, np.float32)
    cx = obj["start_xy"][0] + obj["velocity_px_s"][0] * times
    cy = obj["start_xy"][1] + obj["velocity_px_s"][1] * times
    u = (np.arange(width, dtype=np.float32) + 0.5)[None, None, :] - cx[:, None, None]
    v = (np.arange(height, dtype=np.float32) + 0.5)[None, :, None] - cy[:, None, None]
    r = obj["radius_px"]
    if obj["shape"] == "circle":
        sdf = np.sqrt(u**2 + v**2) - r
    elif obj["shape"] == "square":
        sdf = np.maximum(np.abs(u), np.abs(v)) - 0.85 * r
    elif obj["shape"] == "diamond":
        sdf = (np.abs(u) + np.abs(v) - r) / np.sqrt(2)
    elif obj["shape"] == "triangle":  # pointing up, circumradius r
        sdf = np.maximum(v, 0.866 * np.abs(u) - 0.5 * v) - 0.5 * r
    else:
        raise ValueError(f"unknown shape '{obj['shape']}'")
    return np.clip(0.5 - sdf, 0, 1, dtype=np.float32)


def render(scene: dict, times_s: np.ndarray, width: int, height: int, color: bool) -> np.ndarray:
    """Frames at `times_s`: [T, H, W, 3] float32 RGB in [0, 1] if `color`, else [T, H, W] luminance."""
    bg = background_luma(scene["background"], width, height)[..., None]
    inks = [np.array(COLOR_RGB[o["color"]], np.float32) for o in scene["objects"]]
    if not color:
        inks = [ink @ LUMA for ink in inks]
    frames = np.repeat(np.broadcast_to(bg, (height, width, 3 if color else 1))[None], len(times_s), axis=0)
    for obj, ink in zip(scene["objects"], inks):
        alpha = coverage(obj, times_s, width, height)[..., None]
        frames += alpha * (ink - frames)
    return frames if color else frames[..., 0]


# ---------------------------------------------------------------------------- event camera

def simulate_events(log_frames: np.ndarray, timestamps_us: np.ndarray, threshold: float = 0.2,
                    refractory_us: int = 0, noise_rate: float = 0.0,
                    rng: np.random.Generator | None = None) -> np.ndarray:
    """Events of a pixel array whose log intensity is `log_frames` [T, H, W] at `timestamps_us` [T].

    Each pixel keeps a reference level, set by the first frame. When its log intensity has
    moved n >= 1 whole thresholds from the reference by the next frame, it emits n events
    (p=1 if brighter, 0 if darker) and the reference moves n thresholds; each event's time is
    interpolated linearly to where the intensity crossed that level within the step.
    With refractory_us > 0 a pixel emits at most one event per step and is then blind for
    refractory_us (resolved at the step), its reference following the signal meanwhile, so
    the change during that time is lost. Noise events (noise_rate per pixel per second,
    random polarity, uniform times in (t_0, t_end]) come on top, from `rng` (default seed 0).
    Returns [N] EVENT_DTYPE sorted by t. Works on [T, H*W] arrays: memory O(T * H * W).
    """
    n_steps, height, width = log_frames.shape
    t_us = np.asarray(timestamps_us, np.int64)
    if t_us.shape != (n_steps,) or (np.diff(t_us) <= 0).any():
        raise ValueError("timestamps_us must be [T] and strictly increasing")
    level = log_frames.reshape(n_steps, -1).astype(np.float64) / threshold
    counts, refs = _threshold_crossings(level, t_us, refractory_us)
    events = _crossing_events(level, refs, counts, t_us, width)
    if noise_rate > 0:
        rng = rng if rng is not None else np.random.default_rng(0)
        events = np.concatenate([events, _noise_events(rng, noise_rate, height, width, t_us[0], t_us[-1])])
    return events[np.argsort(events["t"], kind="stable")]


def _threshold_crossings(level: np.ndarray, t_us: np.ndarray, refractory_us: int):
    """Per step and pixel the signed event count [T, P] and the reference before the step [T, P]."""
    n_steps, n_pixels = level.shape
    counts = np.zeros((n_steps, n_pixels), np.int16)
    refs = np.empty((n_steps, n_pixels), np.float64)
    ref = level[0].copy()
    blind_until = np.full(n_pixels, t_us[0], np.int64)
    for i in range(1, n_steps):
        refs[i] = ref
        diff = level[i] - ref
        n = np.trunc(diff + np.copysign(CROSSING_EPS, diff))
        if refractory_us > 0:
            blind = t_us[i] < blind_until
            n[blind] = 0
            np.clip(n, -1, 1, out=n)
            ref[blind] = level[i, blind]
            blind_until[n != 0] = t_us[i] + refractory_us
        ref += n
        counts[i] = n
    return counts, refs


def _crossing_events(level, refs, counts, t_us, width: int) -> np.ndarray:
    """One event per crossed level, its time interpolated inside the step (unsorted)."""
    step, pixel = np.nonzero(counts)
    n = counts[step, pixel].astype(np.int64)
    reps = np.abs(n)
    step, pixel, sign = np.repeat(step, reps), np.repeat(pixel, reps), np.repeat(np.sign(n), reps)
    k = np.arange(reps.sum()) - np.repeat(np.cumsum(reps) - reps, reps) + 1   # 1..|n| within a step
    crossed = refs[step, pixel] + sign * k
    before, after = level[step - 1, pixel], level[step, pixel]
    change = np.where(after != before, after - before, 1.0)
    frac = np.clip(np.where(after != before, (crossed - before) / change, 1.0), 0, 1)
    events = np.empty(len(step), EVENT_DTYPE)
    events["x"], events["y"] = pixel % width, pixel // width
    events["t"] = t_us[step - 1] + np.rint(frac * (t_us[step] - t_us[step - 1])).astype(np.int64)
    events["p"] = sign > 0
    return events


def _noise_events(rng: np.random.Generator, rate: float, height: int, width: int,
                  t_start: int, t_end: int) -> np.ndarray:
    n = rng.poisson(rate * height * width * (t_end - t_start) / 1e6)
    events = np.empty(n, EVENT_DTYPE)
    events["x"], events["y"] = rng.integers(0, width, n), rng.integers(0, height, n)
    events["t"], events["p"] = rng.integers(t_start + 1, t_end + 1, n), rng.integers(0, 2, n)
    return events


# ---------------------------------------------------------------------------- clips on disk

@dataclass
class Clip:
    """What the two cameras record of one scene."""

    events: np.ndarray              # [N] EVENT_DTYPE
    video: np.ndarray               # [F, H, W, 3] uint8, F = duration * video_fps
    event_frames: list[np.ndarray]  # n_event_frames x [H, W, 3] uint8


def record_clip(scene: dict, duration_s: float, world: WorldConfig, rng: np.random.Generator) -> Clip:
    """Render `scene` for `duration_s` and record it with both cameras (`rng`: sensor noise)."""
    w, h = world.width, world.height
    n_steps = round(duration_s * world.internal_fps)
    t_us = np.rint(np.arange(n_steps + 1) * 1e6 / world.internal_fps).astype(np.int64)
    luma = render(scene, t_us / 1e6, w, h, color=False)
    events = simulate_events(np.log(luma + LOG_EPS), t_us, world.threshold, world.refractory_us,
                             world.noise_rate, rng)
    video_times = np.arange(round(duration_s * world.video_fps)) / world.video_fps
    video = np.rint(render(scene, video_times, w, h, color=True) * 255).astype(np.uint8)
    return Clip(events, video, render_event_frames(events, world.n_event_frames, h, w))


def clip_id(index: int, clips_per_seq: int) -> str:
    """"<seq>/<clip:06d>" of the index-th clip, e.g. "synth_01/000003"."""
    return f"synth_{index // clips_per_seq:02d}/{index % clips_per_seq:06d}"


def write_clip(root: Path, index: int, duration: str, seed: int, world: WorldConfig,
               plan_s: float) -> dict:
    """Simulate clip `index` of one duration, write its files under `root`, return its JSON row."""
    scene = sample_scene(np.random.default_rng([seed, index]), world.width, world.height,
                         world.max_objects, plan_s)
    duration_s = duration_seconds(duration)
    noise_rng = np.random.default_rng([seed, index, round(duration_s * 1e6)])
    clip = record_clip(scene, duration_s, world, noise_rng)
    cid = clip_id(index, world.clips_per_seq)
    row = {
        "id": cid, "split": split_of(cid), "duration": duration,
        "event_data": f"event_npy/{cid}.npy", "video_data": f"mp4/{cid}.mp4",
        "event_image": [f"event_image/{cid}_{k}.png" for k in range(len(clip.event_frames))],
    }
    meta = {"height": world.height, "width": world.width, "t_start_us": 0,
            "t_end_us": round(duration_s * 1e6)}
    save_event_clip(root / row["event_data"], clip.events, meta)
    write_video(root / row["video_data"], clip.video, fps=world.video_fps)
    for rel, frame in zip(row["event_image"], clip.event_frames):
        write_image(root / rel, frame)
    target, draft = (captions.references(scene, style) for style in ("target", "draft"))
    return {**row, "conversations": _conversations(captions.questions(), target),
            "ground_truth": scene, "references": {"target": target, "draft": draft},
            "n_events": len(clip.events)}


def _conversations(questions: list[str], answers: list[str]) -> list[dict]:
    """LLaVA-style turns: the event placeholder opens the first question."""
    turns = []
    for k, (q, a) in enumerate(zip(questions, answers)):
        turns += [{"from": "human", "value": f"<event>\n{q}" if k == 0 else q}, {"from": "gpt", "value": a}]
    return turns


def synthesize(out: str | Path, clips: int, seed: int, durations: Sequence[str] = ("1s", "500ms"),
               world: WorldConfig = WorldConfig(), workers: int = 1,
               on_clip: Callable[[], None] | None = None) -> dict[str, Path]:
    """Write `out`/synthetic_<duration> for each duration; returns {duration: dataset root}.

    Scenes are planned for the longest duration. Files of an earlier, larger run in the same
    directories are overwritten where they coincide; the index JSON lists this run's clips only.
    `on_clip` is called after every written clip (both durations count).
    """
    out = Path(out)
    plan_s = max(duration_seconds(d) for d in durations)
    roots = {d: out / f"synthetic_{d}" for d in durations}
    jobs = [(d, i) for d in durations for i in range(clips)]
    job = functools.partial(_clip_job, roots=roots, seed=seed, world=world, plan_s=plan_s)
    rows: dict[str, list[dict]] = {d: [] for d in durations}
    with _ordered_map(workers) as imap:
        for duration, row in imap(job, jobs):
            rows[duration].append(row)
            if on_clip:
                on_clip()
    for duration, root in roots.items():
        write_json(root / f"{root.name}.json", rows[duration])
    return roots


def _clip_job(job: tuple[str, int], roots: dict, seed: int, world: WorldConfig, plan_s: float):
    duration, index = job
    return duration, write_clip(roots[duration], index, duration, seed, world, plan_s)


@contextlib.contextmanager
def _ordered_map(workers: int):
    """An ordered `map(f, xs)`: the builtin for one worker, a forked process pool otherwise."""
    if workers <= 1:
        yield map
        return
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        yield lambda f, xs: pool.imap(f, xs, chunksize=4)
