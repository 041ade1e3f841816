"""cod-v1 vs cod-v2 update episodes on a model (default: the base SmolLM2-135M-Instruct).

For N fact-recall packs, the first task is solved by the reference solver (which does not
know the code yet, so the feedback reveals it) and one update episode is asked of the model
under each prompt set, with and without the prompt set's prefill, at each temperature.
Counted per setting: replies with a well-formed delimited block (strict parse; with a prefill
a missing end line counts, see ``parse_update``), replies that wrote the end line themselves,
notes that hold the code the feedback revealed (lenient parse), and tokens written.

    python benchmarks/prompt_sets.py --model smollm2 --n 12
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from lifecycle_agent import envs, protocol
from lifecycle_agent.models import resolve_model
from lifecycle_agent.models.teacher import ReferenceTeacher
from lifecycle_agent.prompts import get_prompt_set


def update_requests(n: int, prompt_set: str) -> list[tuple[list[dict], str]]:
    env = envs.make("fact-recall")
    teacher = ReferenceTeacher(env, prompt_set)
    requests = []
    for seed in range(n):
        task = env.pack(500_000 + seed, 1).tasks[0]
        messages = protocol.solve_messages("", task.start(), prompt_set, task.instructions)
        reply = teacher.generate(messages).text
        result = task.step(reply)
        transcript = protocol.render_transcript(messages + [{"role": "assistant", "content": reply}])
        requests.append((protocol.update_messages("", transcript, result.reward, result.feedback, 2000, prompt_set), task.code))
    return requests


def measure(model, prompt_set: str, prefill: bool, temperature: float, n: int, max_new_tokens: int) -> dict:
    ps = get_prompt_set(prompt_set)
    blocks = closed = codes = tokens = 0
    started = time.perf_counter()
    for messages, code in update_requests(n, prompt_set):
        start = ps.update_prefill if prefill else ""
        if start:
            messages = messages + [{"role": "assistant", "content": start, "prefill": True}]
        reply = model.generate(messages, temperature=temperature, max_new_tokens=max_new_tokens)
        full = start + reply.text
        blocks += protocol.parse_update(full, "strict", prefilled=bool(start)).status == "ok"
        closed += protocol.CONTEXT_END in reply.text
        note = protocol.parse_update(full, "lenient", prefilled=bool(start)).text or ""
        codes += code in note
        tokens += reply.completion_tokens or 0
    return {"prompt_set": prompt_set, "prefill": prefill, "temperature": temperature, "n": n, "delimited_block": blocks, "end_line_written": closed,
            "code_in_note": codes, "completion_tokens": tokens, "seconds": round(time.perf_counter() - started, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--n", type=int, default=12)
    parser.add_argument("--temperatures", default="0,0.6")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--settings", default="cod-v1,cod-v2,cod-v2+prefill,cod-v3+prefill",
                        help="prompt sets to measure, comma-separated; +prefill gives the set's prefill")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "prompt_sets.json"))
    args = parser.parse_args()
    model = resolve_model(args.model)
    out = Path(args.out)
    # rows of other settings already in the file are kept: the file grows as sets are added
    rows = json.loads(out.read_text())["rows"] if out.is_file() else []
    for temperature in [float(t) for t in args.temperatures.split(",")]:
        for setting in args.settings.split(","):
            prompt_set, _, prefill = setting.partition("+")
            row = measure(model, prompt_set, prefill == "prefill", temperature, args.n, args.max_new_tokens)
            rows = [r for r in rows if (r["prompt_set"], r["prefill"], r["temperature"]) !=
                    (row["prompt_set"], row["prefill"], row["temperature"])] + [row]
            print(json.dumps(row), flush=True)
    out.write_text(json.dumps({"model": args.model, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
