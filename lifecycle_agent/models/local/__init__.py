"""A local transformers causal LM (optionally with a PEFT adapter), batched across callers.

Several agents usually share one local model. Every :meth:`LocalModel.generate` /
:meth:`LocalModel.agenerate` call is tokenized in the caller, then handed to one
background worker thread per loaded model (the *engine*), which batches the requests of
all callers. Two scheduling policies:

- ``continuous`` (the default wherever the model's cache allows it): the worker runs one
  decode loop. A request that arrives while others are decoding joins the batch at the
  next token (its prompt gets one forward pass, its key/value cache is merged into the
  running one), and a row that ends is answered at once and leaves the batch. Short
  replies (a solve episode's answer) no longer wait for long ones (an update episode's
  notes) in the same batch, and the agent behind them moves on to its next call.
- ``static``: the worker takes the first waiting request, waits at most
  ``batch_wait_ms`` for more (up to ``max_batch_size``) and runs them as ONE left-padded
  ``model.generate`` call; every row waits for the longest. Used for models whose cache
  cannot be merged row by row (sliding-window, hybrid and state-space caches).

Rows of a batch may use different temperatures and token budgets: both are applied per
row (each row's logits are scaled by its own temperature, greedy rows take their argmax,
each row ends at its own budget), so a batch never has to be split. Left padding with an
attention mask and per-row position ids make a row's output independent of its batch
mates (up to float rounding).

Every :class:`~lifecycle_agent.models.base.Generation` carries the prompt token ids,
the completion token ids (no padding; the EOS token included when the model produced
it) and one log-prob per completion token, computed from the raw logits as
``log_softmax(logits / T)`` at the row's sampling temperature ``T`` (``T = 1`` for
greedy rows); see :mod:`.sampling`.

The package, one concept per module: :mod:`.loading` (torch import, device, dtype, weights,
adapter), :mod:`.sampling` (the one sampling and log-prob rule), :mod:`.engine` (the model,
tokenizer and worker thread; request intake), :mod:`.schedulers` (continuous and static
batching, the out-of-memory rule) and :mod:`.model` (the public :class:`LocalModel`).
torch and transformers are imported only when used (``import lifecycle_agent`` stays light).
"""

from .engine import SCHEDULING, _Engine, supports_continuous
from .loading import _check_adapter_dir, _dtype_kwarg, attach_adapter, import_torch_stack, load_pretrained, parse_dtype, pick_device
from .model import LOCAL_OPTIONS, LocalModel
from .schedulers import _Continuous, _Static

__all__ = [
    "LocalModel", "LOCAL_OPTIONS", "SCHEDULING", "load_pretrained", "attach_adapter", "import_torch_stack", "parse_dtype",
    "pick_device", "supports_continuous",
]
