"""Environments: a registry of pack makers, built-ins and third-party factories.

>>> from lifecycle_agent import envs
>>> env = envs.make("fact-recall", preset="easy")
>>> pack = env.pack(seed=1, size=4)
>>> len(pack.tasks)
4

Third parties add their own with :func:`register`, or pass ``package.module:factory``
wherever an environment name is accepted.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

from ..errors import EnvironmentSpecError
from .base import PACKING_ALIASES, PACKINGS, Environment, EnvTask, Episode, Pack, canonical_packing, play, play_oracle

__all__ = [
    "Environment", "EnvTask", "Pack", "PACKINGS", "PACKING_ALIASES", "canonical_packing", "Episode", "make", "register", "unregister", "names", "describe",
    "factory_for", "play", "play_oracle",
]

#: Built-in environments, imported on first use: name -> "module:class".
_BUILTINS: dict[str, str] = {
    "fact-recall": "lifecycle_agent.envs.fact_recall:FactRecall",
    "frozen-lake-obscure": "lifecycle_agent.envs.frozen_lake:FrozenLakeObscure",
    "grid-navigation": "lifecycle_agent.envs.grid_navigation:GridNavigation",
    "optimal-control": "lifecycle_agent.envs.optimal_control:OptimalControl",
    "alchemy": "lifecycle_agent.envs.alchemy:Alchemy",
    "terminal": "lifecycle_agent.envs.terminal:Terminal",
    "preference": "lifecycle_agent.envs.preference:Preference",
}
_REGISTERED: dict[str, Callable[..., Environment]] = {}


def register(name: str, factory: Callable[..., Environment], *, overwrite: bool = False) -> None:
    """Register ``factory(preset=..., **options) -> Environment`` under ``name``."""
    if not isinstance(name, str) or not name or ":" in name:
        raise EnvironmentSpecError(f"environment name must be a non-empty string without ':', got {name!r}")
    if not callable(factory):
        raise EnvironmentSpecError(f"environment factory for {name!r} must be callable")
    if not overwrite and (name in _REGISTERED or name in _BUILTINS):
        raise EnvironmentSpecError(f"environment {name!r} is already registered; pass overwrite=True to replace it")
    _REGISTERED[name] = factory


def unregister(name: str) -> None:
    """Remove an environment added with :func:`register` (built-ins cannot be removed)."""
    if name not in _REGISTERED:
        raise EnvironmentSpecError(f"environment {name!r} was not added with register(); registered: {', '.join(sorted(_REGISTERED)) or '(none)'}")
    del _REGISTERED[name]


def names() -> list[str]:
    """Every known environment name (built-in and registered)."""
    return sorted(set(_BUILTINS) | set(_REGISTERED))


def _load(target: str, what: str) -> Callable[..., Environment]:
    module_name, _, attr = target.rpartition(":")
    if not module_name or not attr:
        raise EnvironmentSpecError(f"{what}: expected package.module:factory, got {target!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise EnvironmentSpecError(f"{what}: cannot import module {module_name!r} ({exc})") from None
    except Exception as exc:  # the module's own code failed while importing
        raise EnvironmentSpecError(
            f"{what}: importing module {module_name!r} raised {type(exc).__name__}: {exc}"
        ) from exc
    try:
        return getattr(module, attr)
    except AttributeError:
        raise EnvironmentSpecError(f"{what}: module {module_name!r} has no attribute {attr!r}") from None


def factory_for(name: str) -> Callable[..., Environment]:
    """The factory behind an environment name or ``package.module:factory`` spec."""
    if not isinstance(name, str) or not name.strip():
        raise EnvironmentSpecError(f"environment name must be a non-empty string, got {name!r}")
    if name in _REGISTERED:
        return _REGISTERED[name]
    if name in _BUILTINS:
        return _load(_BUILTINS[name], f"built-in environment {name!r}")
    if ":" in name:
        return _load(name, f"environment {name!r}")
    raise EnvironmentSpecError(f"unknown environment {name!r}; known environments: {', '.join(names())}")


def make(name: str, preset: str = "train", **options: Any) -> Environment:
    """Create an environment by name (or ``package.module:factory``) with a preset and options."""
    factory = factory_for(name)
    try:
        env = factory(preset=preset, **options)
    except EnvironmentSpecError:
        raise
    except Exception as exc:  # a third-party factory's own failure: say whose and how it was called
        given = ", ".join([f"preset={preset!r}"] + [f"{k}={v!r}" for k, v in options.items()])
        raise EnvironmentSpecError(
            f"environment factory {name!r} raised {type(exc).__name__}: {exc} (called as factory({given}); "
            "a factory takes preset= and the environment's options as keywords)"
        ) from exc
    if not isinstance(env, Environment):
        raise EnvironmentSpecError(
            f"environment factory {name!r} returned {type(env).__name__}, not a lifecycle_agent.envs.Environment"
        )
    return env


def describe() -> list[dict[str, Any]]:
    """Name, description, presets (with their full option values), default options, eval pack size and
    what the ``easy`` preset hints (``easy_hints``, empty for none) and whether it has a reference
    policy (``has_reference_policy``) of every known environment.

    A registered factory that is not an :class:`Environment` class is described by its
    docstring; its presets are unknown until it is called.
    """
    rows = []
    for name in names():
        factory = factory_for(name)
        cls = factory if isinstance(factory, type) and issubclass(factory, Environment) else None
        if cls is None:
            doc = (factory.__doc__ or "").strip().split("\n")[0]
            rows.append({"name": name, "description": doc, "presets": [], "preset_options": {}, "options": {},
                         "eval_pack_size": Environment.eval_pack_size, "easy_hints": "",
                         "has_reference_policy": bool(getattr(factory, "has_reference_policy", False))})
            continue
        presets = {preset: {**cls.defaults, **values} for preset, values in cls.presets.items()}
        rows.append(
            {
                "name": name,
                "description": cls.description,
                "presets": list(cls.presets),
                "preset_options": presets,
                "options": dict(cls.defaults),
                "eval_pack_size": cls.eval_pack_size,
                "easy_hints": cls.easy_hints,
                "has_reference_policy": cls.has_reference_policy,
            }
        )
    return rows
