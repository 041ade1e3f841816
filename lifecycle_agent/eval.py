"""Learning curves: mean reward by position in the pack, with and without a context.

:func:`evaluate` runs, for every environment, ``packs`` packs per seed in each mode,
on the same packs (same pack seeds, a fresh :class:`~lifecycle_agent.envs.Pack` per mode):

- ``live``: the CoD loop, the context is rewritten after every task;
- ``frozen``: the context is written once, after the first task, then never updated;
- ``none``: no context at all (the baseline without memory);
- ``ralph``: task 0 of each pack repeated S times (``ralph_sample`` packing), the context live;
- ``ralph_full``: every task of each pack repeated S times in a pack of its own (``ralph_full``
  packing: S packs where the other modes have one), the context live. Not in the default modes.

The pack size S is each environment's :attr:`~lifecycle_agent.envs.Environment.eval_pack_size`
(8, the method's evaluation setting; ``fact-recall`` 4) unless ``pack_size`` is given.

Every pack of every mode is a fresh agent (its own id) in one SQLite file,
``OUT/eval.db``; an interrupted eval run again with the same settings skips the tasks it
finished. The report is computed from the stored episodes only, so a resumed eval and an
uninterrupted one write the same ``report.json`` (apart from its ``timing`` fields).

>>> from lifecycle_agent.eval import evaluate
>>> report = evaluate("fact-recall", "scripted", packs=4, pack_size=4, seeds=[1, 2])  # doctest: +SKIP
>>> report["environments"]["fact-recall"]["modes"]["live"]["by_position"]          # doctest: +SKIP
[0.0, 0.0, 1.0, 1.0]
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import os
import re
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

from . import envs as envs_module
from .agent import LifecycleAgent, TaskRecord
from .errors import EvalError
from .eval_config import (  # noqa: F401 - re-exported: the eval's public names
    DEFAULT_MODES, MODE_ALIASES, MODES, PACK_SEED_STRIDE, EvalConfig, parse_modes, parse_names, parse_seeds,
)
from .prompts import DEFAULT_PROMPT_SET
from .store import Store

_STYLES = {"live": ("-", "o"), "frozen": ("--", "s"), "none": (":", "^"), "ralph": ("-.", "D"), "ralph_full": ("-.", "v")}
REPORT_FORMAT = "lifecycle-agent/eval-report"
#: 2: ``settings.pack_size`` is ``null`` when every environment used its own default, and each
#: environment records its ``pack_size``; mode ``ralph`` records packing ``ralph_sample``.
REPORT_FORMAT_VERSION = 2
#: Pack ``k`` of seed ``s`` uses pack seed ``s * PACK_SEED_STRIDE + k``.
PACK_SEED_STRIDE = 10_000
SETTINGS_FILE = "eval-settings.json"
DB_FILE = "eval.db"
#: Settings that may change between an interrupted eval and its resumption.
_RESUMABLE_CHANGES = ("concurrency",)


@dataclass
class EvalProgress:
    """Passed to ``on_progress`` after every task (and for tasks already done in an earlier run)."""

    done: int
    """Tasks finished so far, all environments and modes together."""
    total: int
    """Tasks in the whole evaluation."""
    env: str
    mode: str
    record: Optional[TaskRecord]
    """The task's record; ``None`` for tasks finished by an earlier, interrupted run."""


# --------------------------------------------------------------------------- input checks


def check_settings(config: EvalConfig | Any = None, **settings: Any) -> dict[str, Any]:
    """Check every evaluation setting (cheap: no model is loaded, nothing is written).

    Takes an :class:`EvalConfig`, or environment name(s) and keyword settings as :func:`evaluate` does.
    Returns the normalised values (``env_names``, ``modes``, ``seeds``, ``prompt_set``), the
    ``environments`` made from them and their ``pack_sizes`` (``pack_size``, or each one's
    default when it is ``None``), and the ``config``; raises :class:`EvalError` or
    :class:`~lifecycle_agent.errors.EnvironmentSpecError` saying what is wrong.
    """
    config = EvalConfig.of(config, **settings)
    environments = {
        name: envs_module.make(name, preset=config.preset, **config.env_options.get(name, {})) for name in config.env
    }
    return {
        "config": config, "env_names": config.env, "modes": config.modes, "seeds": config.seeds,
        "prompt_set": config.prompt_set or DEFAULT_PROMPT_SET, "environments": environments,
        "pack_sizes": {name: config.pack_size or default_pack_size(environments[name]) for name in config.env},
    }


def default_pack_size(env: envs_module.Environment) -> int:
    """The pack size an eval of ``env`` uses when none is given (its ``eval_pack_size``; 8 unless it says)."""
    size = getattr(env, "eval_pack_size", envs_module.Environment.eval_pack_size)
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise EvalError(f"environment {env.name!r} declares eval_pack_size {size!r}; it must be an integer >= 1")
    return size


def _slug(name: str) -> str:
    """``name`` as an agent-id part: kept when it is already safe, else made safe and suffixed
    with a hash of the original, so two names never share a slug (``a:b`` and ``a_b``)."""
    slug = re.sub(r"[^A-Za-z0-9_.-]", "_", name)
    if slug == name and len(slug) <= 48:
        return slug
    return slug[:36] + "-" + hashlib.sha1(name.encode()).hexdigest()[:11]


# --------------------------------------------------------------------------- statistics

#: Two-sided 95% quantiles of Student's t for 1..30 degrees of freedom.
_T95 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
    2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)


def t95(df: int) -> float:
    """Two-sided 95% quantile of Student's t with ``df`` degrees of freedom (table to 30, then a series)."""
    if df < 1:
        raise ValueError("t95 needs at least 1 degree of freedom")
    if df <= len(_T95):
        return _T95[df - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def mean_ci95(
    values: Sequence[float], bounds: Optional[tuple[float, float]] = None
) -> tuple[Optional[float], Optional[float], Optional[float]]:
    """Mean and 95% confidence interval (Student's t) of ``values``; bounds ``None`` for fewer than 2 values.

    ``bounds`` (the environment's reward range) clips the interval: a mean reward cannot leave it.
    """
    if not values:
        return None, None, None
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, None, None
    half = t95(len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    low, high = mean - half, mean + half
    if bounds is not None:
        low, high = max(low, bounds[0]), min(high, bounds[1])
    return mean, low, high


def curve_metrics(by_position: Sequence[Optional[float]]) -> dict[str, Optional[float]]:
    """``gain`` (last position minus first), ``auc`` and ``forgetting`` of a reward-by-position curve.

    ``auc``: trapezoidal area under the curve divided by its width (S - 1), in reward units
    (for S = 1, the single value). ``forgetting``: the largest drop between consecutive
    positions (0 when the curve never drops). ``None`` when a position has no data.
    """
    if not by_position or any(v is None for v in by_position):
        return {"gain": None, "auc": None, "forgetting": None}
    values = list(by_position)
    if len(values) == 1:
        auc = values[0]
    else:
        auc = sum((a + b) / 2 for a, b in zip(values, values[1:])) / (len(values) - 1)
    drops = [a - b for a, b in zip(values, values[1:])]
    return {"gain": values[-1] - values[0], "auc": auc, "forgetting": max([0.0] + drops)}


def _round(value: Optional[float]) -> Optional[float]:
    return None if value is None else round(float(value), 6)


# --------------------------------------------------------------------------- running


@dataclass
class _Job:
    env_key: str
    env: envs_module.Environment
    seed: int
    index: int
    mode: str
    pack_size: int
    #: The task a ``ralph_full`` pack repeats; ``None`` for the other modes.
    instance: Optional[int] = None
    task_ids: Optional[list[str]] = None

    @property
    def pack_seed(self) -> int:
        return self.seed * PACK_SEED_STRIDE + self.index

    @property
    def agent_id(self) -> str:
        repeated = "" if self.instance is None else f".i{self.instance}"
        return f"eval.{_slug(self.env_key)}.{self.env.preset}.s{self.seed}.p{self.index}.{self.mode}{repeated}"

    def make_pack(self) -> envs_module.Pack:
        return self.env.pack(self.pack_seed, self.pack_size, MODES[self.mode][0], self.instance)


def _jobs(checked: dict[str, Any]) -> list[_Job]:
    """Every pack the eval plays: one per environment, seed, pack and mode; ``ralph_full`` one per task of the pack."""
    jobs = []
    for name in checked["env_names"]:
        env, size = checked["environments"][name], checked["pack_sizes"][name]
        for seed in checked["seeds"]:
            for index in range(checked["config"].packs):
                for mode in checked["modes"]:
                    instances = range(size) if MODES[mode][0] == "ralph_full" else [None]
                    jobs += [_Job(name, env, seed, index, mode, size, instance) for instance in instances]
    return jobs


def evaluate(
    env: str | Iterable[str] | EvalConfig,
    model: Any = None,
    *,
    on_progress: Optional[Callable[[EvalProgress], None]] = None,
    **settings: Any,
) -> dict[str, Any]:
    """Measure reward by position for each environment and mode; return the report (a dict).

    Args:
        env: environment name(s) (a list, or ``"a,b"``; ``package.module:factory`` works too), or an
            :class:`~lifecycle_agent.eval_config.EvalConfig` holding every setting.
        model: anything :func:`~lifecycle_agent.models.resolve_model` accepts (``"scripted"``,
            ``"smollm2"``, a :class:`~lifecycle_agent.models.ChatModel`...). One model object
            serves every pack, so a local model batches concurrent packs.
        on_progress: called with an :class:`EvalProgress` after every task.
        **settings: any field of :class:`~lifecycle_agent.eval_config.EvalConfig` (over the config's
            own values when ``env`` is one): ``packs`` (per seed and environment, default 4),
            ``pack_size`` (S; ``None``: each environment's default, :func:`default_pack_size`: 8 as in
            the method's evaluation, ``fact-recall`` 4), ``preset``, ``seeds`` (pack ``k`` of seed ``s``
            has pack seed ``s*10000 + k``), ``modes`` (``live``, ``frozen``, ``none``, ``ralph``, also
            called ``ralph_sample``, and ``ralph_full``; default the first four), ``out`` (directory
            for ``eval.db``, ``report.json``, ``report.md`` and ``curve.png``; ``None``: in memory,
            no files), ``concurrency`` (packs at the same time), the model call settings
            ``temperature``, ``update_temperature``, ``max_new_tokens``, the agent settings
            ``context_budget``, ``parse_policy``, ``prompt_set``, ``env_options``
            (``{"frozen-lake-obscure": {"size": 5}}``) and ``plot``.

    Raises :class:`EvalError` or :class:`~lifecycle_agent.errors.EnvironmentSpecError` for bad
    settings before anything is run or written.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        raise EvalError("evaluate() was called inside a running event loop; use `await aevaluate(...)` there")
    return asyncio.run(aevaluate(env, model, on_progress=on_progress, **settings))


async def aevaluate(
    env: str | Iterable[str] | EvalConfig,
    model: Any = None,
    *,
    on_progress: Optional[Callable[[EvalProgress], None]] = None,
    **settings: Any,
) -> dict[str, Any]:
    """Async twin of :func:`evaluate` (for callers already inside an event loop)."""
    started = time.perf_counter()
    checked = check_settings(env, **settings)
    config: EvalConfig = checked["config"]
    environments = checked["environments"]

    from .models import resolve_model

    out_dir = config.out
    recorded = _settings(checked)
    _compare_stored(out_dir, recorded)  # a mismatch is reported before the model loads
    owns_model = isinstance(model, str) or model is None
    chat_model = resolve_model(model)
    recorded.update(model_id=chat_model.model_id, model_default_temperature=chat_model.default_temperature)
    try:
        store = _open_store(out_dir, recorded)
    except BaseException:
        if owns_model:
            chat_model.close()
        raise
    jobs = _jobs(checked)
    counter = {"done": 0, "total": sum(job.pack_size for job in jobs)}
    errors: list[dict[str, Any]] = []
    agent_settings = dict(context_budget=config.context_budget, parse_policy=config.parse_policy,
                          prompt_set=config.prompt_set)
    call_settings = dict(temperature=config.temperature, update_temperature=config.update_temperature,
                         max_new_tokens=config.max_new_tokens)

    def report_progress(job: _Job, record: Optional[TaskRecord]) -> None:
        counter["done"] += 1
        if on_progress is not None:
            on_progress(EvalProgress(counter["done"], counter["total"], job.env_key, job.mode, record))

    async def run_job(job: _Job, gate: asyncio.Semaphore) -> None:
        async with gate:
            try:
                tasks = job.make_pack().tasks
                job.task_ids = [task.id for task in tasks]
            except Exception as exc:  # an environment's own code failed: record it, evaluate the rest
                errors.append(_job_error(job, f"making the pack raised {type(exc).__name__}: {exc}"))
                for _ in range(job.pack_size):
                    report_progress(job, None)
                return
            agent = LifecycleAgent(
                chat_model, store, job.agent_id, context_mode=MODES[job.mode][1], **agent_settings, **call_settings
            )
            result = await agent.arun(
                tasks, update_after_last=False, on_record=lambda record: report_progress(job, record)
            )
            for _ in result.skipped:
                report_progress(job, None)

    try:
        gate = asyncio.Semaphore(config.concurrency)
        running = [asyncio.ensure_future(run_job(job, gate)) for job in jobs]
        try:
            await asyncio.gather(*running)
        except BaseException:
            # one pack failed past its own error handling (or the eval was interrupted): stop the
            # others and let each record its run as interrupted while the store is still open
            for future in running:
                future.cancel()
            await asyncio.gather(*running, return_exceptions=True)
            raise
        report = build_report(store, jobs, environments, recorded, errors)
        wall = time.perf_counter() - started
        episodes = sum(m["episodes"] for e in report["environments"].values() for m in e["modes"].values())
        report["timing"] = {"wall_seconds": round(wall, 3), "episodes_in_db": episodes}
        if out_dir is not None:
            write_report(report, out_dir, plot=config.plot)
        return report
    finally:
        store.close()
        if owns_model:
            chat_model.close()


def _job_error(job: _Job, message: str) -> dict[str, Any]:
    error = {"env": job.env_key, "mode": job.mode, "seed": job.seed, "pack": job.index, "error": message}
    if job.instance is not None:
        error["instance"] = job.instance
    return error


def _settings(checked: dict[str, Any]) -> dict[str, Any]:
    """The settings an eval directory records (the model's id and default temperature are added once it loads)."""
    config: EvalConfig = checked["config"]
    environments = checked["environments"]
    return {
        "environments": checked["env_names"], "preset": config.preset, "packs": config.packs,
        "pack_size": config.pack_size, "pack_sizes": checked["pack_sizes"], "seeds": checked["seeds"],
        "modes": checked["modes"],
        "prompt_set": checked["prompt_set"], "temperature": config.temperature,
        "update_temperature": config.update_temperature, "max_new_tokens": config.max_new_tokens,
        "context_budget": config.context_budget, "parse_policy": config.parse_policy,
        "env_options": {name: environments[name].options for name in checked["env_names"]},
        "concurrency": config.concurrency,
    }


def check_resume(env: str | Iterable[str] | EvalConfig, out: Optional[str | os.PathLike] = None, **settings: Any) -> None:
    """Every check :func:`evaluate` makes before loading the model: the settings, and that ``out`` holds no eval
    with other settings. The CLI calls it first, so a mistake is reported before a slow model load."""
    checked = check_settings(env, **({"out": out} if out is not None else {}), **settings)
    _compare_stored(checked["config"].out, _settings(checked))


def _compare_stored(out_dir: Optional[Path], settings: dict[str, Any]) -> None:
    """Refuse a directory holding an eval with other settings (only the keys in ``settings`` are compared)."""
    if out_dir is None:
        return
    if out_dir.exists() and not out_dir.is_dir():
        raise EvalError(f"--out {out_dir} exists and is not a directory")
    settings_path, db_path = out_dir / SETTINGS_FILE, out_dir / DB_FILE
    comparable = {k: v for k, v in settings.items() if k not in _RESUMABLE_CHANGES}
    if settings_path.exists():
        try:
            previous = json.loads(settings_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise EvalError(f"{settings_path} cannot be read ({exc}); use a new --out directory") from None
        if "pack_sizes" not in previous and isinstance(previous.get("environments"), list):
            # recorded before per-environment pack sizes existed: every environment used the one pack_size
            previous["pack_sizes"] = {name: previous.get("pack_size") for name in previous["environments"]}
        previous = {k: v for k, v in previous.items() if k not in _RESUMABLE_CHANGES and k in comparable}
        if previous != comparable:
            changed = sorted(k for k in set(previous) | set(comparable) if previous.get(k) != comparable.get(k))
            details = "; ".join(f"{k}: {previous.get(k)!r} -> {comparable.get(k)!r}" for k in changed)
            raise EvalError(
                f"{out_dir} holds an eval with other settings ({details}); resume it with the same settings, "
                "or use a new --out directory"
            )
    elif db_path.exists():
        raise EvalError(f"{db_path} exists but {settings_path.name} is missing; use a new --out directory")


def _open_store(out_dir: Optional[Path], settings: dict[str, Any]) -> Store:
    """The eval database; refuses a directory holding an eval with other settings."""
    if out_dir is None:
        return Store(":memory:")
    _compare_stored(out_dir, settings)
    settings_path, db_path = out_dir / SETTINGS_FILE, out_dir / DB_FILE
    if not settings_path.exists():
        out_dir.mkdir(parents=True, exist_ok=True)
        _write_atomic(settings_path, json.dumps(settings, indent=2) + "\n")
    return Store(db_path)


# --------------------------------------------------------------------------- the report


def build_report(
    store: Store,
    jobs: list[_Job],
    environments: dict[str, envs_module.Environment],
    settings: dict[str, Any],
    errors: Optional[list[dict[str, Any]]] = None,
) -> dict[str, Any]:
    """The report (without ``timing``) from the episodes stored for ``jobs``."""
    report: dict[str, Any] = {
        "format": REPORT_FORMAT,
        "format_version": REPORT_FORMAT_VERSION,
        "model": {"id": settings["model_id"], "default_temperature": settings["model_default_temperature"]},
        "prompt_set": settings["prompt_set"],
        "settings": {
            k: v for k, v in settings.items()
            if k not in ("model_id", "model_default_temperature", "prompt_set", "env_options", "concurrency", "pack_sizes")
        },
        "environments": {},
        "errors": sorted(errors or [], key=lambda e: (e["env"], e["mode"], e["seed"], e["pack"], e.get("instance", -1))),
    }
    for name, env in environments.items():
        entry = {
            "name": env.name or name,
            "description": env.description,
            "preset": env.preset,
            "options": env.options,
            "pack_size": settings["pack_sizes"][name],
            "pack_seeds": sorted({job.pack_seed for job in jobs if job.env_key == name}),
            "modes": {},
        }
        for mode in settings["modes"]:
            mode_jobs = [j for j in jobs if j.env_key == name and j.mode == mode]
            entry["modes"][mode] = _mode_summary(store, mode, mode_jobs, settings["pack_sizes"][name])
        report["environments"][name] = entry
    return report


def _mode_summary(store: Store, mode: str, jobs: list[_Job], pack_size: int) -> dict[str, Any]:
    columns: list[list[float]] = [[] for _ in range(pack_size)]
    failed, tasks, episodes = 0, 0, 0
    prompt_tokens = completion_tokens = 0
    seconds = 0.0
    update_status: dict[str, int] = {}
    task_errors: list[str] = []
    for job in jobs:
        if job.task_ids is None or not store.has_agent(job.agent_id):
            continue
        rows = store.episodes(job.agent_id, limit=None)
        episodes += len(rows)
        solves = {row.task_id: row for row in rows if row.kind == "solve"}  # the latest solve per task
        for row in rows:
            prompt_tokens += row.prompt_tokens or 0
            completion_tokens += row.completion_tokens or 0
            seconds += row.duration_s or 0.0
            if row.kind == "update":
                update_status[row.status] = update_status.get(row.status, 0) + 1
        for position, task_id in enumerate(job.task_ids):
            row = solves.get(task_id)
            if row is None:
                continue
            tasks += 1
            if row.status == "failed" or row.reward is None:
                failed += row.status == "failed"
                if row.error and row.error not in task_errors:
                    task_errors.append(row.error)
            columns[position].append(float(row.reward) if row.reward is not None else 0.0)
    by_position, ci95, counts = [], [], []
    bounds = getattr(jobs[0].env, "reward_range", None) if jobs else None
    for values in columns:
        mean, low, high = mean_ci95(values, bounds)
        by_position.append(_round(mean))
        ci95.append([_round(low), _round(high)])
        counts.append(len(values))
    metrics = curve_metrics(by_position)
    every = [v for values in columns for v in values]
    return {
        "packing": MODES[mode][0],
        "context_mode": MODES[mode][1],
        "by_position": by_position,
        "ci95": ci95,
        "n": counts,
        "gain": _round(metrics["gain"]),
        "auc": _round(metrics["auc"]),
        "forgetting": _round(metrics["forgetting"]),
        "mean_reward": _round(statistics.fmean(every)) if every else None,
        "tasks": tasks,
        "episodes": episodes,
        "failed_tasks": failed,
        "task_errors": task_errors[:5],
        "update_status": dict(sorted(update_status.items())),
        "prompt_tokens_per_task": _round(prompt_tokens / tasks) if tasks else None,
        "completion_tokens_per_task": _round(completion_tokens / tasks) if tasks else None,
        "timing": {"seconds_per_task": round(seconds / tasks, 4) if tasks else None},
    }


def strip_timing(report: Any) -> Any:
    """The report without its ``timing`` fields (what the determinism promise covers)."""
    if isinstance(report, dict):
        return {k: strip_timing(v) for k, v in report.items() if k != "timing"}
    if isinstance(report, list):
        return [strip_timing(v) for v in report]
    return report


def _fmt(value: Optional[float], digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _count(counts: Sequence[int]) -> str:
    """Packs behind each position: one number when every position has the same."""
    return str(counts[0]) if counts and len(set(counts)) == 1 else "/".join(map(str, counts)) or "0"


def _signed(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:+.2f}"


def position_cell(mode: dict[str, Any], position: int) -> str:
    """``mean [low, high]`` of one position: the 95% interval, within the reward range (``mean`` alone without one)."""
    mean = mode["by_position"][position]
    low, high = mode["ci95"][position]
    if mean is None:
        return "-"
    if low is None:
        return f"{mean:.2f}"
    return f"{mean:.2f} [{low:.2f}, {high:.2f}]"


def table_rows(report: dict[str, Any], env: str, compact: bool = False) -> tuple[list[str], list[list[str]]]:
    """Header and rows of one environment's table (shared by report.md and the terminal).

    ``compact`` (narrow terminals): position means without their intervals, and no token or time columns.
    """
    entry = report["environments"][env]
    size = entry["pack_size"]
    header = ["mode", "n"] + [f"pos {j}" for j in range(size)] + ["gain", "AUC", "forget"]
    if not compact:
        header += ["tok/task", "s/task"]
    rows = []
    for mode, data in entry["modes"].items():
        cells = [_fmt(data["by_position"][j]) if compact else position_cell(data, j) for j in range(size)]
        row = [mode, _count(data["n"])] + cells + [_signed(data["gain"]), _fmt(data["auc"]), _fmt(data["forgetting"])]
        if not compact:
            tokens = None
            if data["prompt_tokens_per_task"] is not None:
                tokens = data["prompt_tokens_per_task"] + data["completion_tokens_per_task"]
            row += ["-" if tokens is None else f"{tokens:.0f}", _fmt(data["timing"]["seconds_per_task"], 3)]
        rows.append(row)
    return header, rows


def markdown_report(report: dict[str, Any]) -> str:
    """``report.md``: settings and one table per environment."""
    s = report["settings"]
    lines = [
        "# Evaluation: reward by position in the pack",
        "",
        f"Model `{report['model']['id']}`, prompt set `{report['prompt_set']}`, preset `{s['preset']}`, "
        f"{s['packs']} pack(s) x seeds {', '.join(map(str, s['seeds']))}, pack size {_pack_size_text(report)}, "
        f"temperature {s['temperature'] if s['temperature'] is not None else 'model default'}, "
        f"max_new_tokens {s['max_new_tokens'] if s['max_new_tokens'] is not None else 'model default'}.",
        "",
        "Cells: mean reward [95% confidence interval over packs and seeds, clipped to the reward range]; "
        "n = packs behind each position. "
        "gain = last position minus first; AUC = area under the curve / (S - 1); forget = largest drop "
        "between consecutive positions; tok/task = prompt + completion tokens per task (solve and update "
        "episodes); s/task = model and environment seconds per task. ralph_full: n counts its packs, "
        "S per pack of the other modes (every task of the pack repeated in a pack of its own).",
    ]
    for env in report["environments"]:
        header, rows = table_rows(report, env)
        lines += ["", f"## {env}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        failed = {m: d["failed_tasks"] for m, d in report["environments"][env]["modes"].items() if d["failed_tasks"]}
        if failed:
            lines += ["", "Failed tasks (counted as reward 0): " + ", ".join(f"{m} {n}" for m, n in failed.items())]
    if report["errors"]:
        lines += ["", "## Errors", ""] + [f"- {e['env']} {e['mode']} seed {e['seed']} pack {e['pack']}: {e['error']}" for e in report["errors"]]
    return "\n".join(lines) + "\n"


def _pack_size_text(report: dict[str, Any]) -> str:
    """``8``, or ``each environment's default (fact-recall 4, alchemy 8)`` when none was given."""
    given = report["settings"]["pack_size"]
    if given is not None:
        return str(given)
    sizes = ", ".join(f"{name} {entry['pack_size']}" for name, entry in report["environments"].items())
    return f"each environment's default ({sizes})"


def plot_curves(report: dict[str, Any], path: str | os.PathLike) -> None:
    """``curve.png``: reward by position, one line per mode (95% band), one panel per environment."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state is touched

    names = list(report["environments"])
    columns = min(3, len(names))
    rows = math.ceil(len(names) / columns)
    figure = Figure(figsize=(6.4 * columns, 4.6 * rows))
    axes = figure.subplots(rows, columns, squeeze=False)
    for ax, name in zip(axes.flat, names):
        positions = list(range(report["environments"][name]["pack_size"]))
        seen = [0.0, 1.0]
        for mode, data in report["environments"][name]["modes"].items():
            seen += [v for v in data["by_position"] if v is not None]
            means = [math.nan if v is None else v for v in data["by_position"]]
            style, marker = _STYLES.get(mode, ("-", "o"))
            # distinct line style and marker per mode, markers hollow and slightly offset, so that
            # identical curves (all modes at 0, say) stay visible instead of hiding each other
            shift = 0.04 * (list(_STYLES).index(mode) - 1.5) if mode in _STYLES else 0.0
            (line,) = ax.plot([p + shift for p in positions], means, linestyle=style, marker=marker, markersize=8,
                              markerfacecolor="none", markeredgewidth=1.6, linewidth=2, label=mode)
            # rewards are bounded (built-ins: 0..1), a t-interval is not: draw the band inside
            # the range the rewards can take, widened only if this mode's means leave it
            floor = min([0.0] + [v for v in data["by_position"] if v is not None])
            ceiling = max([1.0] + [v for v in data["by_position"] if v is not None])
            low = [math.nan if lo is None else max(floor, lo) for lo, _ in data["ci95"]]
            high = [math.nan if hi is None else min(ceiling, hi) for _, hi in data["ci95"]]
            ax.fill_between(positions, low, high, color=line.get_color(), alpha=0.12, linewidth=0)
        ax.set_title(report["environments"][name].get("name") or name, fontsize=12)
        ax.set_xlabel("position in pack")
        ax.set_ylabel("mean reward")
        ax.set_xticks(positions)
        ax.set_ylim(min(seen) - 0.05, max(seen) + 0.05)  # at least [0, 1], where built-in rewards lie
        ax.grid(alpha=0.3)
        ax.legend(fontsize=10)
    for ax in list(axes.flat)[len(names):]:
        ax.set_visible(False)
    figure.suptitle(f"{report['model']['id']} · preset {report['settings']['preset']}", fontsize=12)
    figure.tight_layout()
    tmp = Path(str(path) + ".tmp.png")
    figure.savefig(tmp, dpi=120)
    os.replace(tmp, path)


def write_report(report: dict[str, Any], out_dir: str | os.PathLike, *, plot: bool = True) -> None:
    """Write ``report.json``, ``report.md`` and (with ``plot``) ``curve.png`` into ``out_dir``."""
    out_dir = Path(out_dir)
    _write_atomic(out_dir / "report.json", json.dumps(report, indent=2) + "\n")
    _write_atomic(out_dir / "report.md", markdown_report(report))
    if plot:
        plot_curves(report, out_dir / "curve.png")


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
