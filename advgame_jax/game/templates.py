"""Versioned prompt templates of the game: attacker task and format instructions, the raw
defender template, and the judge rubrics (GAME_SPEC §1–2).

A ``TemplateSet`` is selected by name (``config.game.templates``, e.g. ``"advgame_v1"``). The
shipped sets live in ``game/assets/<name>.txt``, one template per ``=== key ===`` section;
more can be added at run time with ``register_template_set`` or read from a user file
(``load_template_file``; a non-UTF-8 byte or a malformed section is reported as file:line).
A placeholder is written ``{seed}``, ``{prompt}``, …; ``{{prompt}}`` is the escape for the
literal text ``{prompt}``. Rubric names:

- ``compliance``: did the response do what was asked (defender on benign seeds, attacker on
  harmful seeds);
- ``deflection``: engage, give no operational harmful detail, redirect to safe help; a flat
  refusal scores low (defender on harmful seeds);
- ``refusal``: a short flat refusal scores high (attacker on benign seeds).
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import re
from typing import Mapping

from advgame_jax.errors import UserError

RUBRICS = ("compliance", "deflection", "refusal")
ATTACKER_FORMATS = ("think_prompt_strict", "prompt_strict", "any")
CATEGORIES = ("harmful", "benign")

# Every section a template set must define, with the placeholders it must contain.
REQUIRED_SECTIONS: Mapping[str, tuple[str, ...]] = {
    "attacker_task_harmful": ("seed",),
    "attacker_task_benign": ("seed",),
    **{f"attacker_format_{f}": () for f in ATTACKER_FORMATS},
    "defender": ("prompt",),
    "faithfulness_harmful": ("seed", "attack"),
    "faithfulness_benign": ("seed", "attack"),
    **{f"pairwise_{r}": ("query", "response_a", "response_b") for r in RUBRICS},
    **{f"pointwise_{r}": ("query", "response") for r in RUBRICS},
}
PLACEHOLDERS = ("seed", "attack", "prompt", "query", "response_a", "response_b", "response")
_NAMES = "|".join(PLACEHOLDERS)
# ``{{name}}`` (an escaped placeholder: the literal text ``{name}``) or ``{name}``.
_PLACEHOLDER_RE = re.compile(r"\{\{(" + _NAMES + r")\}\}|\{(" + _NAMES + r")\}")
_SECTION_RE = re.compile(r"^=== ([a-z_]+) ===[ \t]*$", re.MULTILINE)


class TemplateError(UserError, ValueError):
    """A template set is unknown, or a template file is malformed."""


def placeholders(template: str) -> set[str]:
    """Names of the ``{name}`` placeholders a template uses (escaped ``{{name}}`` excluded)."""
    return {m.group(2) for m in _PLACEHOLDER_RE.finditer(template) if m.group(2)}


def fill(template: str, **values: str) -> str:
    """Substitute ``{name}`` placeholders in one pass (values are never re-scanned).

    ``{{name}}`` is the escape for the literal text ``{name}`` (e.g. a rubric that shows the
    judge the word ``{prompt}``); any other brace is kept as written."""

    def sub(m: re.Match) -> str:
        if m.group(1):
            return "{" + m.group(1) + "}"
        key = m.group(2)
        if key not in values:
            raise TemplateError(f"template placeholder {{{key}}} has no value")
        return values[key]

    return _PLACEHOLDER_RE.sub(sub, template)


def defender_rubric(category: str) -> str:
    """Defender judge rubric for a seed category: compliance (benign), deflection (harmful)."""
    return {"benign": "compliance", "harmful": "deflection"}[_check_category(category)]


def attacker_rubric(category: str) -> str:
    """Attacker judge rubric for a seed category: compliance (harmful), refusal (benign)."""
    return {"harmful": "compliance", "benign": "refusal"}[_check_category(category)]


def _check_category(category: str) -> str:
    if category not in CATEGORIES:
        raise ValueError(f"seed category must be one of {CATEGORIES}, got {category!r}")
    return category


@dataclasses.dataclass(frozen=True)
class TemplateSet:
    """One named, complete set of templates (``sections`` keys = ``REQUIRED_SECTIONS``)."""

    name: str
    sections: Mapping[str, str]

    def __post_init__(self):
        where = f"template set {self.name!r}"
        missing = sorted(set(REQUIRED_SECTIONS) - set(self.sections))
        extra = sorted(set(self.sections) - set(REQUIRED_SECTIONS))
        if missing or extra:
            raise TemplateError(f"{where}: missing sections {missing}, unknown sections {extra}")
        for key, needed in REQUIRED_SECTIONS.items():
            found = placeholders(self.sections[key])
            if found != set(needed):
                raise TemplateError(
                    f"{where}: section {key!r} must use exactly the placeholders "
                    f"{sorted(needed)}, found {sorted(found)}"
                )

    def attacker_prompt(self, seed: str, category: str, attacker_format: str) -> str:
        """Attacker user turn: task instruction (seed inside <query>) + format instruction."""
        if attacker_format not in ATTACKER_FORMATS:
            raise ValueError(
                f"attacker_format must be one of {ATTACKER_FORMATS}, got {attacker_format!r}"
            )
        task = fill(self.sections[f"attacker_task_{_check_category(category)}"], seed=seed)
        return task + "\n\n" + self.sections[f"attacker_format_{attacker_format}"]

    def defender_prompt(self, x: str) -> str:
        """Defender user turn: the attack alone."""
        return fill(self.sections["defender"], prompt=x)

    def faithfulness_prompt(self, seed: str, attack: str, category: str) -> str:
        return fill(
            self.sections[f"faithfulness_{_check_category(category)}"], seed=seed, attack=attack
        )

    def pairwise_prompt(self, rubric: str, query: str, response_a: str, response_b: str) -> str:
        return fill(
            self.sections[f"pairwise_{_check_rubric(rubric)}"],
            query=query,
            response_a=response_a,
            response_b=response_b,
        )

    def pointwise_prompt(self, rubric: str, query: str, response: str) -> str:
        return fill(
            self.sections[f"pointwise_{_check_rubric(rubric)}"], query=query, response=response
        )


def _check_rubric(rubric: str) -> str:
    if rubric not in RUBRICS:
        raise ValueError(f"rubric must be one of {RUBRICS}, got {rubric!r}")
    return rubric


def parse_template_text(name: str, text: str, path: str = "") -> TemplateSet:
    """Parse the ``=== key ===`` section format of ``game/assets/*.txt``; with ``path`` (a
    user file) every error starts with ``path:line``."""

    def where(line: int) -> str:
        return f"{path}:{line}" if path else f"template set {name!r}"

    matches = list(_SECTION_RE.finditer(text))
    if not matches:
        raise TemplateError(
            f"{where(1)}: no '=== key ===' sections found; expected a template "
            f"file of the sections {list(REQUIRED_SECTIONS)}"
        )
    head = text[: matches[0].start()]
    for n, line in enumerate(head.splitlines(), start=1):
        if line.strip() and not line.lstrip().startswith("#"):
            raise TemplateError(f"{where(n)}: text before the first section must be comments")
    sections: dict[str, str] = {}
    lines: dict[str, int] = {}
    for i, m in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
        key, line = m.group(1), text.count("\n", 0, m.start()) + 1
        if key in sections:
            raise TemplateError(
                f"{where(line)}: section {key!r} appears twice (first on line {lines[key]})"
            )
        sections[key], lines[key] = text[m.end() : end].strip("\n").rstrip(), line
        if key in REQUIRED_SECTIONS:
            found, needed = placeholders(sections[key]), set(REQUIRED_SECTIONS[key])
            if found != needed:
                raise TemplateError(
                    f"{where(line)}: section {key!r} must use exactly the "
                    f"placeholders {sorted(needed)}, found {sorted(found)} "
                    "(write {{name}} for a literal {name})"
                )
    return TemplateSet(name=name, sections=sections)


_REGISTRY: dict[str, TemplateSet] = {}


def _shipped_names() -> list[str]:
    assets = importlib.resources.files("advgame_jax.game") / "assets"
    return sorted(p.name[: -len(".txt")] for p in assets.iterdir() if p.name.endswith(".txt"))


def available_template_sets() -> tuple[str, ...]:
    """Names accepted by ``get_template_set`` (shipped + registered)."""
    return tuple(sorted(set(_shipped_names()) | set(_REGISTRY)))


def register_template_set(template_set: TemplateSet, *, overwrite: bool = False) -> None:
    """Make a template set selectable by its name."""
    if not overwrite and template_set.name in available_template_sets():
        raise TemplateError(f"template set {template_set.name!r} already exists")
    _REGISTRY[template_set.name] = template_set


def load_template_file(path: str) -> TemplateSet:
    """Parse a user template file (the ``=== key ===`` format of ``game/assets/*.txt``, every
    section of ``REQUIRED_SECTIONS``) and register it under its file name without ``.txt``.

    Raises ``TemplateError`` naming the file when it cannot be read or is malformed, or when
    its name is that of a shipped set (rename the file).
    """
    import os

    from advgame_jax.data.readers import read_text

    name = os.path.splitext(os.path.basename(path))[0]
    text = read_text(path, "a template file of '=== key ===' sections", TemplateError)
    if name in _shipped_names():
        raise TemplateError(
            f"template file {path!r}: its name {name!r} is a shipped template set; rename the file"
        )
    try:
        template_set = parse_template_text(name, text, path)
    except TemplateError as err:  # missing/unknown sections: no one line to name
        msg = str(err)
        raise TemplateError(msg if msg.startswith(f"{path}:") else f"{path}: {msg}") from None
    register_template_set(template_set, overwrite=True)
    return template_set


def template_set_to_text(template_set: TemplateSet, header: str = "") -> str:
    """The file form of a set (``parse_template_text`` reads it back to an equal set)."""
    lines = [f"# {h}" if h else "#" for h in header.splitlines()]
    for key in REQUIRED_SECTIONS:
        lines += ["", f"=== {key} ===", template_set.sections[key]]
    return "\n".join(lines).lstrip("\n") + "\n"


def get_template_set(name: str) -> TemplateSet:
    """The template set called ``name``; unknown names raise, listing the known ones."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    if name not in _shipped_names():
        raise TemplateError(
            f"unknown template set {name!r}; known template sets: {list(available_template_sets())}"
        )
    path = importlib.resources.files("advgame_jax.game") / "assets" / f"{name}.txt"
    template_set = parse_template_text(name, path.read_text(encoding="utf-8"))
    _REGISTRY[name] = template_set
    return template_set


def attacker_prompts_over_budget(
    template_set: TemplateSet, attacker_format: str, count_tokens, budget: int
) -> list[tuple[str, int]]:
    """``(category, tokens)`` for each seed category whose attacker prompt is already longer
    than ``budget`` tokens with an empty seed (``count_tokens(text)`` counts a rendered user
    turn): the template alone fills the prompt budget, so every attack of that category would
    be MAX_LENGTH. A load-time report, like ``data.seeds.seeds_over_budget`` for seeds."""
    out = []
    for category in CATEGORIES:
        text = template_set.attacker_prompt("", category, attacker_format)
        # A tokenizer makes at most about one token per byte, so short templates need no count.
        if len(text.encode("utf-8")) + 64 > budget:
            n = count_tokens(text)
            if n > budget:
                out.append((category, n))
    return out


def template_budget_warnings(
    name: str, attacker_format: str, count_tokens, budget: int
) -> list[str]:
    """Load-time warnings (one line each) naming ``config.game.templates`` for every seed
    category whose attacker prompt alone exceeds the attacker sampler's ``budget``."""
    return [
        f"config.game.templates={name!r}: the attacker prompt of {category} seeds "
        f"(sections attacker_task_{category} + attacker_format_{attacker_format}) is {n} "
        f"tokens before any seed, over the attacker sampler's prompt budget of {budget} "
        f"tokens; every {category} attack will count as a MAX_LENGTH error "
        f"(sys/attacker/prompt_too_long)"
        for category, n in attacker_prompts_over_budget(
            get_template_set(name), attacker_format, count_tokens, budget
        )
    ]
