"""Learnability of the game environments: the observation-only reference policy, ``live`` vs ``none``.

For ``frozen-lake-obscure``, ``grid-navigation`` (also with ``reveal_across_pack=false``) and
``optimal-control`` at the ``train`` preset, :func:`lifecycle_agent.eval.evaluate` runs the
environment's reference policy (:class:`~lifecycle_agent.models.teacher.ReferenceTeacher`: it sees
what an agent sees and keeps notes, never the pack) as the model, exactly as ``lifecycle-agent eval``
runs any model, and reports the mean reward by position in ``live`` (notes kept) and ``none`` (no
notes) mode, next to the oracle's mean reward over the same tasks.

Run: ``python benchmarks/game_envs_reference.py [--packs 64] [--pack-size 8]``. Prints a markdown
table and writes ``benchmarks/results/game_envs_reference.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lifecycle_agent import envs
from lifecycle_agent.eval import evaluate
from lifecycle_agent.models.teacher import ReferenceTeacher

CASES = [
    ("frozen-lake-obscure", {}),
    ("grid-navigation", {}),
    ("grid-navigation", {"reveal_across_pack": False}),
    ("optimal-control", {}),
]
SEED = 1


def measure(name: str, options: dict, packs: int, pack_size: int) -> dict:
    env = envs.make(name, **options)
    prompt_set = "cod-v2"
    report = evaluate(name, ReferenceTeacher(env, prompt_set), packs=packs, pack_size=pack_size, seeds=[SEED],
                      modes=["live", "none"], prompt_set=prompt_set, env_options={name: options}, plot=False)
    modes = report["environments"][name]["modes"]
    # the oracle over the same pack seeds as the eval (pack k of seed s has pack seed s*10000 + k)
    oracle = [envs.play_oracle(task).reward for k in range(packs) for task in env.pack(SEED * 10000 + k, pack_size).tasks]
    return {
        "env": name, "options": options, "packs": packs, "pack_size": pack_size,
        "live": modes["live"]["by_position"], "none": modes["none"]["by_position"],
        "oracle": sum(oracle) / len(oracle),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--packs", type=int, default=64)
    parser.add_argument("--pack-size", type=int, default=8)
    args = parser.parse_args()
    rows = [measure(name, options, args.packs, args.pack_size) for name, options in CASES]
    print("| environment | mode | " + " | ".join(f"p{j}" for j in range(args.pack_size)) + " | oracle |")
    print("|---|---|" + "---|" * (args.pack_size + 1))
    for row in rows:
        label = row["env"] + "".join(f" {k}={json.dumps(v)}" for k, v in row["options"].items())
        for mode in ("live", "none"):
            cells = " | ".join(f"{value:.3f}" for value in row[mode])
            print(f"| {label} | {mode} | {cells} | {row['oracle']:.3f} |")
    out = Path(__file__).parent / "results" / "game_envs_reference.json"
    out.write_text(json.dumps(rows, indent=1) + "\n")
    print(f"wrote {out.relative_to(Path(__file__).parent.parent)}")


if __name__ == "__main__":
    main()
