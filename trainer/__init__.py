"""LoRA GRPO with per-episode (CoD) credit over the runtime's own rollouts.

>>> from trainer import CoDConfig, train                                   # doctest: +SKIP
>>> result = train(CoDConfig(output_dir="runs/fr", envs=["fact-recall"], max_steps=50))  # doctest: +SKIP
>>> result.adapter_dir   # load with LifecycleAgent(model="smollm2@runs/fr")            # doctest: +SKIP

The pure parts (``credit``, ``loss``, ``cod_config``) import no heavy dependency; the
trainer itself (torch, transformers, trl, peft) loads on first use.
"""

from __future__ import annotations

__all__ = [
    "CoDConfig",
    "CoDTrainer",
    "TrainResult",
    "train",
    "cod_advantages",
    "reweight_advantages",
    "cod_policy_loss",
]

_LAZY = {
    "CoDConfig": ".cod_config",
    "CoDTrainer": ".cod_trainer",
    "TrainResult": ".cod_trainer",
    "train": ".cod_trainer",
    "cod_advantages": ".credit",
    "reweight_advantages": ".credit",
    "cod_policy_loss": ".loss",
}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'trainer' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
