"""The questions put to an LLM (method.md, section 1), as versioned templates.

Each question asks for a JSON answer checked against the schema of its kind
(`schemas.py`). TEMPLATE_VERSION is part of every cache key: change it whenever
a template's wording changes, so that old answers are not reused for new
questions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from imfree.toolkit.labels import ClassInfo

TEMPLATE_VERSION = "1"

QuestionKind = Literal["appearance", "context", "cooccurrence", "grouping"]

# Several narrow questions per class instead of one broad one: answers vary more
# (not one template filled in), and each stays short enough to come back whole.
APPEARANCE_ANGLES = (
    "its overall shape and its parts",
    "its colours, materials and surface",
    "its size, pose and the camera's viewpoint",
    "the light, the weather and the time of day",
)
CONTEXT_ANGLES = (
    "its most typical setting",
    "a less common but realistic setting",
    "people or animals around it",
    "a busy scene with many other things in view",
)
COOCCURRENCE_ANGLES = (
    "pairs of classes",
    "three to five classes",
)

_SENTENCE_RULES = (
    "Each sentence reads like the caption of a real photograph, is 8 to 30 words long, "
    "and is worded differently from the others (do not start them all the same way)."
)


@dataclass(frozen=True)
class Question:
    kind: QuestionKind
    requested: tuple[str, ...]  # class keys the question is about
    prompt: str


@dataclass(frozen=True)
class QuestionPlan:
    """How many sentences to ask for; the defaults aim at ~100 sentences a class."""

    sentences_per_question: int = 8
    appearance_angles: int = len(APPEARANCE_ANGLES)
    context_angles: int = len(CONTEXT_ANGLES)
    cooccurrence_angles: int = len(COOCCURRENCE_ANGLES)
    grouping: bool = True


def plan_questions(classes: list[ClassInfo], plan: QuestionPlan | None = None) -> list[Question]:
    """Every question for a label set: per class and kind, then the grouping question."""
    plan = plan or QuestionPlan()
    n = plan.sentences_per_question
    questions = []
    for info in classes:
        others = [c for c in classes if c.name != info.name]
        for angle in APPEARANCE_ANGLES[: plan.appearance_angles]:
            questions.append(Question("appearance", (info.name,), appearance(info, angle, n)))
        for angle in CONTEXT_ANGLES[: plan.context_angles]:
            questions.append(Question("context", (info.name,), context(info, others, angle, n)))
        for angle in COOCCURRENCE_ANGLES[: plan.cooccurrence_angles]:
            questions.append(Question("cooccurrence", (info.name,),
                                      cooccurrence(info, classes, angle, n)))
    if plan.grouping and len(classes) > 1:
        questions.append(Question("grouping", tuple(c.name for c in classes), grouping(classes)))
    return questions


def appearance(info: ClassInfo, angle: str, n: int) -> str:
    return (
        f"Write {n} sentences, each describing a photo in which {_named(info)} is clearly "
        f"visible, focusing on what it looks like: {angle}. Every sentence must name it "
        f"{_naming_rule(info)}. {_SENTENCE_RULES}\n"
        'Answer with JSON only, in the form {"sentences": ["...", "..."]}.'
    )


def context(info: ClassInfo, others: list[ClassInfo], angle: str, n: int) -> str:
    listed = ", ".join(f'"{c.prompt_name}"' for c in others) or "(none)"
    return (
        f"Write {n} sentences, each describing a photo of a scene where {_named(info)} is "
        f"usually seen, focusing on {angle}. Every sentence must name it {_naming_rule(info)}. "
        f"Where it is natural, also name other things from this list that are often nearby: "
        f"{listed}. {_SENTENCE_RULES}\n"
        'Answer with JSON only, in the form {"sentences": ["...", "..."]}.'
    )


def cooccurrence(info: ClassInfo, classes: list[ClassInfo], angle: str, n: int) -> str:
    listed = ", ".join(f'"{c.prompt_name}"' for c in classes)
    return (
        f"Here is a list of classes: {listed}.\n"
        f"Choose {n} different combinations of classes from the list, focusing on {angle}; "
        f"every combination includes {_named(info)} and only classes that plausibly appear "
        f"together in one photograph. For each combination write one sentence describing "
        f"such a photo that names every class of the combination. {_SENTENCE_RULES}\n"
        'Answer with JSON only, in the form {"photos": [{"classes": ["...", "..."], '
        '"sentence": "..."}]}, spelling each class exactly as in the list.'
    )


def grouping(classes: list[ClassInfo]) -> str:
    listed = ", ".join(f'"{c.prompt_name}"' for c in classes)
    return (
        f"Here is a list of classes for a photo classifier: {listed}.\n"
        "Sort them into fine groups of at most 8 classes that look alike or usually appear "
        "together, then sort the fine groups into a few coarse groups, each a kind of scene. "
        "Every class goes into exactly one fine group and every fine group into exactly one "
        "coarse group; give each group a short descriptive name.\n"
        'Answer with JSON only, in the form {"fine": {"group name": ["class", "..."]}, '
        '"coarse": {"scene name": ["group name", "..."]}}, spelling each class exactly as '
        "in the list."
    )


def _named(info: ClassInfo) -> str:
    return f'"{info.prompt_name}"'


def _naming_rule(info: ClassInfo) -> str:
    synonyms = [s for s in info.synonyms if s.lower() != info.prompt_name.lower()][:6]
    if not synonyms:
        return f'with the word "{info.prompt_name}" or its plural'
    listed = ", ".join(f'"{s}"' for s in synonyms)
    return f'with the word "{info.prompt_name}", its plural, or one of {listed}'
