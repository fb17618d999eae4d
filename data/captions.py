"""Questions and reference answers about a synthetic clip, generated from its ground truth.

Two answer styles per question:
- TARGET (the video model): sees colour, e.g. "In the video, a small red circle moves
  slowly to the left across a dark striped background."
- DRAFT (the event camera): sees only moving edges, no colour, and words things its own
  way, e.g. "The event stream shows a small round shape moving leftward slowly over a
  striped background."

Ground truth (what `data.synth.sample_scene` writes in each JSON row under "ground_truth"):
{"background": {"texture", "tone"}, "objects": [{"shape", "color", "size", "direction",
"speed", ...numeric fields}]}. Only the categorical fields are used here.

The vocabulary is small and closed: `vocabulary()` lists every token `words()` can produce
from a question or an answer, so a word-level tokenizer can be built from it.
"""

from __future__ import annotations

import functools
import itertools
import re
from collections.abc import Callable

SHAPES = ("circle", "square", "triangle", "diamond")
COLORS = ("red", "green", "blue", "yellow", "purple", "orange")
SIZES = ("small", "large")
DIRECTIONS = ("left", "right", "up", "down")
SPEEDS = ("slow", "fast")
TEXTURES = ("striped", "checkered", "dotted", "plain")
TONES = ("dark", "light")
MAX_OBJECTS = 3

QUESTIONS = (
    "What is happening in this scene?",
    "Describe the objects and their motion.",
    "What color is the moving object?",
    "Which direction is the object moving?",
    "What shape is the moving object?",
    "What does the background look like?",
)

_COUNT = {1: "one", 2: "two", 3: "three"}
_SPEED_T = {"slow": "slowly", "fast": "quickly"}
_DIR_T = {"left": "to the left", "right": "to the right", "up": "upward", "down": "downward"}
_SHAPE_D = {"circle": "round", "square": "square", "triangle": "triangular", "diamond": "diamond"}
_SIZE_D = {"small": "small", "large": "big"}
_SPEED_D = {"slow": "slowly", "fast": "rapidly"}
_DIR_D = {"left": "leftward", "right": "rightward", "up": "upward", "down": "downward"}


def questions() -> list[str]:
    """The default question list of the synthetic world (conf/data/synthetic_*.yaml lists the same)."""
    return list(QUESTIONS)


def references(truth: dict, style: str) -> list[str]:
    """One reference answer per question of `questions()`, in `style` "target" or "draft"."""
    table = {"target": _TARGET, "draft": _DRAFT}[style]
    return [table[q](truth["objects"], truth["background"]) for q in QUESTIONS]


def words(text: str) -> list[str]:
    """The word-level tokenization the vocabulary is built for: lowercase words and . , ? marks."""
    return re.findall(r"[a-z]+|[.,?]", text.lower())


@functools.cache
def vocabulary() -> list[str]:
    """Every token `words()` yields on any question or reference answer, sorted."""
    vocab = set(itertools.chain.from_iterable(words(q) for q in QUESTIONS))
    for truth in _covering_truths():
        for style in ("target", "draft"):
            vocab.update(itertools.chain.from_iterable(words(a) for a in references(truth, style)))
    return sorted(vocab)


def _covering_truths():
    """Ground truths that together use every word: each single object on each background, plus
    every object count (count-dependent words do not depend on the objects' attributes)."""
    backgrounds = [{"texture": x, "tone": t} for x in TEXTURES for t in TONES]
    attrs = ("shape", "color", "size", "direction", "speed")
    objects = [dict(zip(attrs, v)) for v in itertools.product(SHAPES, COLORS, SIZES, DIRECTIONS, SPEEDS)]
    for bg in backgrounds:
        yield from ({"objects": [obj], "background": bg} for obj in objects)
        yield from ({"objects": objects[:n], "background": bg} for n in range(2, MAX_OBJECTS + 1))


# ---------------------------------------------------------------------------- phrasing

def _sentence(text: str) -> str:
    return text[0].upper() + text[1:]


def _and(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _motion_t(o: dict) -> str:
    return f"moves {_SPEED_T[o['speed']]} {_DIR_T[o['direction']]}"


def _named_t(o: dict) -> str:
    return f"{o['color']} {o['shape']}"


def _thing_t(o: dict) -> str:
    return f"a {o['size']} {_named_t(o)}"


def _thing_d(o: dict) -> str:
    return f"a {_SIZE_D[o['size']]} {_SHAPE_D[o['shape']]} shape"


def _motion_d(o: dict) -> str:
    return f"moving {_DIR_D[o['direction']]} {_SPEED_D[o['speed']]}"


def _t_scene(objs, bg):
    acts = _and([f"{_thing_t(o)} {_motion_t(o)}" for o in objs])
    return f"In the video, {acts} across a {bg['tone']} {bg['texture']} background."


def _t_describe(objs, bg):
    head = "There is one object" if len(objs) == 1 else f"There are {_COUNT[len(objs)]} objects"
    each = " ".join(f"The {_named_t(o)} is {o['size']} and {_motion_t(o)}." for o in objs)
    return f"{head} in the video. {each}"


def _t_color(objs, bg):
    if len(objs) == 1:
        return f"The moving object is {objs[0]['color']}."
    return _sentence(_and([f"the {o['shape']} is {o['color']}" for o in objs]) + ".")


def _t_direction(objs, bg):
    return _sentence(_and([f"the {_named_t(o)} is moving {_DIR_T[o['direction']]}" for o in objs]) + ".")


def _t_shape(objs, bg):
    verb = "object is" if len(objs) == 1 else "objects are"
    return f"The moving {verb} {_and(['a ' + _named_t(o) for o in objs])}."


def _t_background(objs, bg):
    if bg["texture"] == "plain":
        return f"The background is {bg['tone']} and plain."
    return f"The background is {bg['tone']} with a {bg['texture']} pattern."


def _d_scene(objs, bg):
    acts = _and([f"{_thing_d(o)} {_motion_d(o)}" for o in objs])
    return f"The event stream shows {acts} over a {bg['texture']} background."


def _d_describe(objs, bg):
    head = "one shape" if len(objs) == 1 else f"{_COUNT[len(objs)]} shapes"
    each = " ".join(_sentence(f"{_thing_d(o)} is {_motion_d(o)}.") for o in objs)
    return f"The events outline {head}. {each}"


def _d_color(objs, bg):
    return f"The events carry no color, only the edges of {_and([_thing_d(o) for o in objs])}."


def _d_direction(objs, bg):
    return _sentence(_and([f"the {_SHAPE_D[o['shape']]} shape is moving {_DIR_D[o['direction']]}"
                           for o in objs]) + ".")


def _d_shape(objs, bg):
    return f"The events outline {_and([_thing_d(o) for o in objs])}."


def _d_background(objs, bg):
    if bg["texture"] == "plain":
        return "The background produces almost no events."
    return f"The background shows {bg['texture']} edges where the shapes pass."


Answer = Callable[[list, dict], str]
_TARGET: dict[str, Answer] = dict(zip(QUESTIONS, (_t_scene, _t_describe, _t_color, _t_direction,
                                                  _t_shape, _t_background)))
_DRAFT: dict[str, Answer] = dict(zip(QUESTIONS, (_d_scene, _d_describe, _d_color, _d_direction,
                                                 _d_shape, _d_background)))
