"""Model adapters behind one interface, and :func:`resolve_model` for objects and spec strings.

Heavy adapters (transformers, agentscope, openai) are imported only when used.

Spec strings (CLI, server, config files):

- ``smollm2-cod`` (the default): the embedded SmolLM2-135M-Instruct with the LoRA adapter shipped in the
  package, trained by ``benchmarks/train_learning.py`` to write and use notes;
- ``smollm2`` or ``smollm2@ADAPTER_DIR``: the untrained embedded SmolLM2-135M-Instruct, optionally with a PEFT adapter;
- ``hf:PATH`` or ``hf:PATH@ADAPTER_DIR``: a local transformers model directory, optionally with a PEFT adapter;
- ``openai:MODEL``: an OpenAI-compatible endpoint (``--base-url`` / ``OPENAI_BASE_URL``, ``OPENAI_API_KEY``);
- ``py:package.module:callable``: a Python callable ``fn(messages) -> str`` or a :class:`ChatModel`;
- ``scripted``: :class:`~lifecycle_agent.models.scripted.ScriptedModel`, a deterministic note-taking policy.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any, Optional

from ..errors import ModelSpecError
from .base import ChatModel, Generation
from .python import CallableModel

__all__ = ["ChatModel", "Generation", "CallableModel", "resolve_model", "check_spec", "SPEC_FORMS", "DEFAULT_MODEL"]

#: The model used when none is given: SmolLM2-135M-Instruct with the shipped CoD adapter.
DEFAULT_MODEL = "smollm2-cod"

SPEC_FORMS = (
    "smollm2-cod (the default: SmolLM2-135M-Instruct + the shipped adapter trained for this protocol)",
    "smollm2[@ADAPTER_DIR] (the untrained base, optionally with your adapter)",
    "hf:PATH[@ADAPTER_DIR]",
    "openai:MODEL (with --base-url or OPENAI_BASE_URL)",
    "py:package.module:callable",
    "scripted (a deterministic note-taking policy for tests and demos)",
)


def _spec_error(spec: str, why: str) -> ModelSpecError:
    forms = "\n  ".join(SPEC_FORMS)
    return ModelSpecError(f"model spec {spec!r}: {why}. Valid forms:\n  {forms}")


def _path_hint(exc: ImportError, module_name: str) -> str:
    """A hint when the spec's own module is missing and the current directory is not importable."""
    missing = getattr(exc, "name", None)
    if not isinstance(exc, ModuleNotFoundError) or not missing:
        return ""
    if missing != module_name and not module_name.startswith(missing + "."):
        return ""  # the module was found; something it imports is missing
    if os.getcwd() in (os.path.abspath(entry or ".") for entry in sys.path):
        return ""
    return (
        "; the current directory is not on the import path: for a module file here, run with "
        "PYTHONPATH=. or install it as a package"
    )


def _split_adapter(rest: str) -> tuple[str, Optional[str]]:
    if "@" in rest:
        path, adapter = rest.rsplit("@", 1)
        return path, adapter or None
    return rest, None


def _is_agentscope_model(obj: Any) -> bool:
    return any(
        cls.__name__ == "ChatModelBase" and cls.__module__.startswith("agentscope")
        for cls in type(obj).__mro__
    )


def resolve_model(
    model: Any = None,
    *,
    base_url: Optional[str] = None,
    api_key: Optional[str] = None,
    device: Optional[str] = None,
    dtype: Optional[str] = None,
    **options: Any,
) -> ChatModel:
    """Turn what a user passed as ``model=`` into a :class:`ChatModel`.

    Accepts ``None`` (the embedded default SmolLM2-135M-Instruct), a :class:`ChatModel`,
    an agentscope ``ChatModelBase``, a plain callable ``fn(messages) -> str``, or a spec
    string (see the module docstring). ``options`` go to the adapter's constructor.
    """
    if model is None:
        model = DEFAULT_MODEL
    if isinstance(model, ChatModel):
        return model
    if isinstance(model, str):
        return _from_spec(model, base_url=base_url, api_key=api_key, device=device, dtype=dtype, **options)
    if _is_agentscope_model(model):
        from .agentscope_model import AgentScopeModel

        return AgentScopeModel(model, **options)
    if hasattr(model, "generate") and hasattr(model, "config"):
        raise ModelSpecError(
            "a transformers model object needs its tokenizer: pass "
            "lifecycle_agent.models.local.LocalModel(model, tokenizer=...) instead"
        )
    if callable(model):
        return CallableModel(model)
    raise ModelSpecError(
        f"cannot use {type(model).__name__} as a model: pass a ChatModel, an agentscope ChatModelBase, "
        f"a callable fn(messages) -> str, or a spec string ({', '.join(SPEC_FORMS)})"
    )


def check_spec(spec: Any) -> None:
    """Check the form of a model spec string without loading anything (a :class:`ModelSpecError` if wrong).

    Commands call it before they create a database or load a model, so a typo costs nothing.
    Whether the model then loads (a missing file, module or endpoint) is only known by loading it.
    """
    if not isinstance(spec, str):
        raise ModelSpecError(f"a model spec is a string, got {type(spec).__name__}")
    spec = spec.strip()
    if not spec:
        raise _spec_error(spec, "empty spec")
    head, sep, rest = spec.partition(":")
    if spec in ("scripted", "smollm2-cod", "smollm2") or spec.startswith("smollm2@"):
        return
    if not sep:
        raise _spec_error(spec, "unknown form")
    if head == "hf":
        if not _split_adapter(rest)[0]:
            raise _spec_error(spec, "hf: needs a model directory")
    elif head == "openai":
        if not rest:
            raise _spec_error(spec, "openai: needs a model name")
    elif head == "scripted":
        raise _spec_error(spec, "scripted: takes no argument; use 'scripted'")
    elif head == "py":
        module_name, sep2, attr = rest.rpartition(":")
        if not sep2 or not module_name or not attr:
            raise _spec_error(spec, "py: needs package.module:callable")
    else:
        raise _spec_error(spec, f"unknown prefix {head + ':'!r}")


def _from_spec(spec: str, *, base_url, api_key, device, dtype, **options) -> ChatModel:
    check_spec(spec)
    spec = spec.strip()
    head, sep, rest = spec.partition(":")
    if spec == "scripted":
        from .scripted import ScriptedModel

        return ScriptedModel()
    if spec == "smollm2-cod":
        from .smollm2 import load_smollm2_cod

        return load_smollm2_cod(device=device, dtype=dtype, **options)
    if spec == "smollm2" or spec.startswith("smollm2@"):
        _, adapter = _split_adapter(spec)
        from .smollm2 import load_smollm2

        return load_smollm2(adapter=adapter, device=device, dtype=dtype, **options)
    if head == "hf":
        path, adapter = _split_adapter(rest)
        from .local import LocalModel

        return LocalModel.from_pretrained(path, adapter=adapter, device=device, dtype=dtype, **options)
    if head == "openai":
        from .openai_compat import OpenAIModel

        return OpenAIModel(rest, base_url=base_url, api_key=api_key, **options)
    if head == "py":
        module_name, sep2, attr = rest.rpartition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise _spec_error(spec, f"cannot import module {module_name!r} ({exc}){_path_hint(exc, module_name)}") from None
        try:
            target = getattr(module, attr)
        except AttributeError:
            raise _spec_error(spec, f"module {module_name!r} has no attribute {attr!r}") from None
        if isinstance(target, type) and issubclass(target, ChatModel):
            return target(**options)
        if isinstance(target, ChatModel):
            return target
        if not callable(target):
            raise _spec_error(spec, f"{attr!r} is not callable")
        return CallableModel(target, model_id=spec)
    raise AssertionError(f"check_spec accepted {spec!r} but no branch loads it")  # pragma: no cover
