"""``EvalConfig``: every setting of an evaluation, with its default, limit and meaning, in one place.

:func:`lifecycle_agent.eval.evaluate` and ``lifecycle-agent eval`` both read it: the CLI takes its
defaults, limits and help texts from the fields below instead of restating them. Building a config
checks every value (cheap: nothing is loaded or written) and raises
:class:`~lifecycle_agent.errors.EvalError` naming the setting.

>>> from lifecycle_agent.eval_config import EvalConfig
>>> EvalConfig.of("fact-recall,preference", packs=8, seeds="1-3").seeds
[1, 2, 3]
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import EvalError
from .prompts import get_prompt_set
from .settings import MAX_CONTEXT_BUDGET, ParsePolicy

#: Mode name -> (packing, context mode of the agent).
MODES: dict[str, tuple[str, str]] = {
    "live": ("cod", "live"),
    "frozen": ("cod", "frozen"),
    "none": ("cod", "none"),
    "ralph": ("ralph_sample", "live"),
    "ralph_full": ("ralph_full", "live"),
}
#: Other names a mode is known by (the reference's packing name).
MODE_ALIASES = {"ralph_sample": "ralph"}
#: Modes an eval runs unless told otherwise (``ralph_full`` plays S times as many tasks: asked for by name).
DEFAULT_MODES = ("live", "frozen", "none", "ralph")
#: Pack ``k`` of seed ``s`` has pack seed ``s * PACK_SEED_STRIDE + k`` (so ``packs`` is at most this).
PACK_SEED_STRIDE = 10_000


def parse_seeds(value: Any) -> list[int]:
    """Seeds from a list of integers or a string like ``"1,2,3"`` or ``"1-5"``."""
    if isinstance(value, str):
        items: list[int] = []
        for part in value.replace(" ", "").split(","):
            if not part:
                continue
            match = re.fullmatch(r"(-?\d+)(?:-(-?\d+))?", part)
            if not match:
                raise EvalError(f"seeds: {part!r} is not an integer or a range like 1-5 (give e.g. --seeds 1,2,3)")
            low, high = int(match.group(1)), int(match.group(2) or match.group(1))
            if high < low:
                raise EvalError(f"seeds: range {part!r} runs backwards")
            items += range(low, high + 1)
        value = items
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    try:
        seeds = list(value)
    except TypeError:
        raise EvalError(f"seeds must be integers, got {value!r}") from None
    for seed in seeds:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise EvalError(f"seeds must be integers, got {seed!r}")
    if not seeds:
        raise EvalError("give at least one seed")
    if len(set(seeds)) != len(seeds):
        raise EvalError(f"seeds repeat: {seeds}; each seed must appear once")
    return seeds


def parse_names(value: Any, what: str = "environment") -> list[str]:
    """A list of names from a list or a comma-separated string."""
    names = [v.strip() for v in value.split(",")] if isinstance(value, str) else list(value or [])
    names = [n for n in names if n]
    if not names:
        raise EvalError(f"give at least one {what}")
    if len(set(names)) != len(names):
        raise EvalError(f"{what}s repeat: {', '.join(names)}")
    return names


def parse_modes(value: Any) -> list[str]:
    """Mode names (aliases resolved) from a list or ``"live,none"``; unknown names are a clear error."""
    names = parse_names(value, "mode")
    unknown = [m for m in names if m not in MODES and m not in MODE_ALIASES]
    if unknown:
        aliases = ", ".join(f"{alias} = {mode}" for alias, mode in MODE_ALIASES.items())
        raise EvalError(f"unknown mode(s) {', '.join(unknown)}; modes: {', '.join(MODES)} ({aliases})")
    return parse_names([MODE_ALIASES.get(m, m) for m in names], "mode")  # an alias beside its mode repeats


def _integer(value: Any, what: str, low: int = 1, high: Optional[int] = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise EvalError(f"{what} must be an integer >= {low}, got {value!r}")
    if high is not None and value > high:
        raise EvalError(f"{what} must be at most {high}, got {value}")
    return value


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or value < 0:
        raise EvalError(f"{what} must be a number >= 0, got {value!r}")
    return float(value)


class EvalConfig(BaseModel):
    """The settings of one evaluation (the model is passed separately)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    env: list[str] = Field(description="Environment name(s), comma-separated; package.module:factory works.")
    packs: int = Field(default=4, ge=1, le=PACK_SEED_STRIDE, description="Packs per seed and environment.")
    pack_size: Optional[int] = Field(
        default=None, ge=1,
        description="Tasks per pack (positions 0..S-1). Default: each environment's own, 8 as in the method's "
        "evaluation (fact-recall 4); `envs list --json` shows eval_pack_size.",
    )
    preset: str = Field(default="train", description="Environment preset: train, easy or hard.")
    seeds: list[int] = Field(default=[1], description="Seeds, e.g. 1,2,3 or 1-5; pack k of seed s has pack seed s*10000+k.")
    modes: list[str] = Field(
        default=list(DEFAULT_MODES),
        description="Modes to run, from: " + ", ".join(MODES) + " ("
        + ", ".join(f"{alias} = {mode}" for alias, mode in MODE_ALIASES.items())
        + "; ralph_full plays every task of a pack S times, S packs per pack).",
    )
    out: Optional[Path] = Field(
        default=None, description="Directory for eval.db, report.json, report.md, curve.png (rerun to resume)."
    )
    concurrency: int = Field(default=4, ge=1, description="Packs run at the same time over one shared model.")
    temperature: Optional[float] = Field(default=None, ge=0, description="Sampling temperature (default: the model's).")
    update_temperature: Optional[float] = Field(
        default=None, ge=0, description="Temperature of update episodes (default: the solve temperature)."
    )
    max_new_tokens: Optional[int] = Field(default=None, ge=1, description="Tokens per model call (default: the model's).")
    context_budget: Optional[int] = Field(
        default=None, ge=1, le=MAX_CONTEXT_BUDGET, description="Context budget, characters (default: the agent's)."
    )
    parse_policy: Optional[ParsePolicy] = Field(default=None, description="lenient or strict (default: the agent's).")
    prompt_set: Optional[str] = Field(default=None, description="Prompt set id (default: the current one).")
    env_options: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description='Per-environment options, {"frozen-lake-obscure": {"size": 5}}.'
    )
    plot: bool = Field(default=True, description="Write curve.png (needs matplotlib) when out is given.")

    # ------------------------------------------------------------ checks (our own words, not pydantic's)
    @field_validator("env", mode="before")
    @classmethod
    def _env(cls, value: Any) -> list[str]:
        return parse_names(value)

    @field_validator("seeds", mode="before")
    @classmethod
    def _seeds(cls, value: Any) -> list[int]:
        return parse_seeds(value)

    @field_validator("modes", mode="before")
    @classmethod
    def _modes(cls, value: Any) -> list[str]:
        return parse_modes(value)

    @field_validator("packs", "pack_size", "concurrency", "max_new_tokens", "context_budget", mode="before")
    @classmethod
    def _integers(cls, value: Any, info) -> Any:
        if value is None and info.field_name != "packs" and info.field_name != "concurrency":
            return None
        field = cls.model_fields[info.field_name]
        high = next((m.le for m in field.metadata if getattr(m, "le", None) is not None), None)
        return _integer(value, info.field_name.replace("_", " "), 1, high)

    @field_validator("temperature", "update_temperature", mode="before")
    @classmethod
    def _temperatures(cls, value: Any, info) -> Any:
        return None if value is None else _number(value, info.field_name.replace("_", " "))

    @field_validator("parse_policy", mode="before")
    @classmethod
    def _parse_policy(cls, value: Any) -> Any:
        if value not in (None, "strict", "lenient"):
            raise EvalError(f"parse policy must be strict or lenient, got {value!r}")
        return value

    @field_validator("prompt_set", mode="before")
    @classmethod
    def _prompt_set(cls, value: Any) -> Any:
        if value is not None:
            try:
                get_prompt_set(value)
            except ValueError as exc:
                raise EvalError(str(exc)) from None
        return value

    @field_validator("env_options", mode="after")
    @classmethod
    def _env_options(cls, value: dict, info) -> dict:
        stray = [name for name in value if name not in info.data.get("env", [])]
        if stray:
            raise EvalError(f"env_options names environment(s) not evaluated: {', '.join(stray)}")
        return value

    # ------------------------------------------------------------ building
    @classmethod
    def of(cls, env: Any, /, **settings: Any) -> "EvalConfig":
        """A checked config from ``env`` (names, or an :class:`EvalConfig` to change) and keyword settings.

        Over a config, a keyword changes that setting (``env=`` too) and ``None`` means "not given":
        the config's value stays. From names, ``None`` means the setting's default (so a caller can
        pass every keyword through). Raises :class:`EvalError` naming the setting that is wrong.
        """
        unknown = sorted(set(settings) - set(cls.model_fields))
        if unknown:
            raise EvalError(f"unknown eval setting(s) {', '.join(unknown)}; settings: {', '.join(cls.model_fields)}")
        if isinstance(env, EvalConfig):
            given = {k: v for k, v in settings.items() if v is not None}
            base = env.model_dump()
        else:
            given = {k: v for k, v in settings.items() if v is not None or cls.model_fields[k].default is None}
            base = {"env": env}
        try:
            return cls(**{**base, **given})
        except ValidationError as exc:
            raise _eval_error(exc) from None


def _eval_error(exc: ValidationError) -> EvalError:
    """The first problem of a validation error in our words: a check's own message, else pydantic's with the setting."""
    first = exc.errors()[0]
    own = (first.get("ctx") or {}).get("error")
    if isinstance(own, Exception):
        return own if isinstance(own, EvalError) else EvalError(str(own))
    where = ".".join(str(part) for part in first["loc"]) or "settings"
    return EvalError(f"{where}: {first['msg']}, got {first.get('input')!r}")
