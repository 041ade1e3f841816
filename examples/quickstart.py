# test-args: --model scripted --db {tmp}/quickstart.db
"""Quick start: a persistent agent over a built-in environment, printing its context as it evolves.

    python examples/quickstart.py                 # the embedded SmolLM2-135M-Instruct
    python examples/quickstart.py --model scripted   # a deterministic scripted model (instant)

The agent solves a pack of related tasks (secret codes of a few items, revealed by
feedback). After every task it rewrites its own context; later tasks are solved with
it. Run it twice: the second run resumes the same agent from its database.
"""

from __future__ import annotations

import argparse

from lifecycle_agent import LifecycleAgent, envs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model spec (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--db", default="quickstart.db", help="SQLite file holding the agent")
    parser.add_argument("--tasks", type=int, default=6, help="tasks in the pack")
    parser.add_argument("--seed", type=int, default=7, help="pack seed: which hidden facts the tasks share")
    args = parser.parse_args()

    pack = envs.make("fact-recall").pack(seed=args.seed, size=args.tasks)
    agent = LifecycleAgent(model=args.model, db=args.db, agent_id="quickstart", max_new_tokens=96)

    def show(record) -> None:
        reward = "-" if record.reward is None else f"{record.reward:.0f}"
        print(f"\ntask {record.position}: answered {record.answer!r}, reward {reward}")
        print(f"  feedback: {record.feedback}")
        print(f"  context v{agent.context_version} ({record.update_status}):")
        for line in (agent.context or "(empty)").splitlines():
            print(f"    | {line}")

    result = agent.run(pack.tasks, on_record=show)
    if result.skipped:
        print(f"\n{len(result.skipped)} task(s) were already done by this agent (resumed from {args.db}).")
    rewards = [r.reward for r in result.records if r.reward is not None]
    if rewards:
        print(f"\nmean reward {sum(rewards) / len(rewards):.2f} over {len(rewards)} task(s); "
              f"{len(agent.history())} context versions stored in {args.db}")


if __name__ == "__main__":
    main()
