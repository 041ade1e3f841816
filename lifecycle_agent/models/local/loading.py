"""Loading a local transformers model: torch import, device and dtype choice, weights, tokenizer, PEFT adapter.

torch and transformers are imported lazily, so that a missing install gives a
:class:`~lifecycle_agent.errors.ModelSpecError` saying what to install instead of an
ImportError from deep inside.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Union

from ...errors import ModelSpecError

_INSTALL_HINT = "install the `local` extra: pip install 'lifecycle-agent[local]'"


def import_torch_stack(what: str = "a local model"):
    """Import torch and transformers, or raise :class:`ModelSpecError` saying what to install."""
    try:
        import torch
        import transformers
    except ImportError as exc:
        raise ModelSpecError(
            f"{what} needs torch and transformers, which are not importable ({exc}); {_INSTALL_HINT}"
        ) from None
    return torch, transformers


_DTYPES = {
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
}


def pick_device(device: Any = None) -> str:
    """``device`` as a string; ``None`` means ``cuda`` when a GPU is visible, else ``cpu``."""
    torch, _ = import_torch_stack()
    if device is None or device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(device)


def parse_dtype(dtype: Any, device: str):
    """A ``torch.dtype`` for ``dtype`` (``"float32"``, ``"bf16"``, a ``torch.dtype``, ...).

    ``None`` / ``"auto"``: float32 on CPU (the measured setup, exact log-probs), bfloat16 on
    a GPU that supports it, else float16 on GPU.
    """
    torch, _ = import_torch_stack()
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        if str(device).startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    name = _DTYPES.get(str(dtype).lower().removeprefix("torch."))
    if name is None:
        raise ModelSpecError(f"unknown dtype {dtype!r}: use one of float32, bfloat16, float16 (or auto)")
    return getattr(torch, name)


def _dtype_kwarg(transformers) -> str:
    """transformers renamed ``torch_dtype=`` to ``dtype=`` in 4.56."""
    try:
        major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    except ValueError:
        return "dtype"
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


def _eos_ids(model, tokenizer) -> list[int]:
    ids: list[int] = []
    gen_cfg = getattr(model, "generation_config", None)
    for source in (getattr(gen_cfg, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if source is None:
            continue
        for value in source if isinstance(source, (list, tuple)) else [source]:
            if value is not None and int(value) not in ids:
                ids.append(int(value))
    return ids


def _context_limit(model) -> Optional[int]:
    config = getattr(model, "config", None)
    if config is None:
        return None
    if hasattr(config, "get_text_config"):
        try:
            config = config.get_text_config()
        except Exception:  # pragma: no cover - exotic configs
            pass
    limit = getattr(config, "max_position_embeddings", None)
    return int(limit) if isinstance(limit, int) and limit > 0 else None



def load_pretrained(
    path: Union[str, Path],
    *,
    adapter: Union[str, Path, None] = None,
    device: Any = None,
    dtype: Any = None,
) -> tuple[Any, Any]:
    """``(model, tokenizer)`` from a local directory, on ``device`` in ``dtype``, in eval mode.

    With ``adapter`` the model is a ``PeftModel`` (the adapter is injected into a fresh copy
    of the base weights). Raises :class:`ModelSpecError` with what is wrong and what to do.
    """
    directory = Path(path).expanduser()
    if not directory.exists():
        raise ModelSpecError(
            f"hf:{path}: no such directory {str(directory)!r}; pass a local transformers model directory "
            "(config.json, weights, tokenizer files). Models are never downloaded at run time."
        )
    if not directory.is_dir() or not (directory / "config.json").is_file():
        raise ModelSpecError(
            f"hf:{path}: {str(directory)!r} is not a transformers model directory (no config.json in it); "
            "save one with model.save_pretrained(dir) and tokenizer.save_pretrained(dir)"
        )
    adapter_dir = _check_adapter_dir(adapter) if adapter else None
    torch, transformers = import_torch_stack(f"hf:{path}")
    dev = pick_device(device)
    torch_dtype = parse_dtype(dtype, dev)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except Exception as exc:
        raise ModelSpecError(
            f"hf:{path}: cannot load the tokenizer from {str(directory)!r} ({type(exc).__name__}: {exc}); "
            "save it next to the model with tokenizer.save_pretrained(dir)"
        ) from exc
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(directory), local_files_only=True, **{_dtype_kwarg(transformers): torch_dtype}
        )
    except Exception as exc:
        raise ModelSpecError(
            f"hf:{path}: cannot load a causal LM from {str(directory)!r} ({type(exc).__name__}: {exc})"
        ) from exc
    try:
        model.to(dev)
    except Exception as exc:
        raise ModelSpecError(f"hf:{path}: cannot move the model to device {dev!r} ({type(exc).__name__}: {exc})") from exc
    model.eval()
    if adapter_dir is not None:
        model = attach_adapter(model, adapter_dir)
    return model, tokenizer


def _check_adapter_dir(adapter: Union[str, Path]) -> Path:
    directory = Path(adapter).expanduser()
    if not directory.is_dir():
        raise ModelSpecError(
            f"adapter {str(adapter)!r}: no such directory; pass a PEFT adapter saved with "
            "PeftModel.save_pretrained(dir) (it holds adapter_config.json)"
        )
    if not (directory / "adapter_config.json").is_file():
        raise ModelSpecError(
            f"adapter {str(adapter)!r}: not a PEFT adapter directory (no adapter_config.json in it); "
            "pass the directory written by PeftModel.save_pretrained(dir)"
        )
    return directory


def attach_adapter(model: Any, adapter: Union[str, Path]) -> Any:
    """Wrap ``model`` in a ``PeftModel`` with the adapter in ``adapter`` (inference mode, ``.eval()``)."""
    directory = _check_adapter_dir(adapter)
    try:
        from peft import PeftModel
    except ImportError:
        raise ModelSpecError(f"adapter {str(adapter)!r}: loading a PEFT adapter needs peft; {_INSTALL_HINT}") from None
    try:
        peft_model = PeftModel.from_pretrained(model, str(directory), is_trainable=False)
    except Exception as exc:
        raise ModelSpecError(
            f"adapter {str(adapter)!r}: cannot load it onto this base model ({type(exc).__name__}: {exc}); "
            "check that it was trained on the same base model"
        ) from exc
    peft_model.eval()
    return peft_model