"""Write the distillation demo's prompts: the questions of the Velmora SFT data with every answer removed.

``velmora_prompts_train.jsonl`` holds each user question of ``velmora_train.jsonl`` as a ``prompt`` row (with the
row's system message as ``system`` where it has one); the second question of a two-question conversation becomes
a row of its own, because keeping the first exchange as context would show the student an answer.
``velmora_prompts_eval.jsonl`` holds the held-out questions of ``velmora_eval.jsonl`` the same way. Rerunning gives
the same files.

    python examples/data/make_velmora_prompts.py
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).parent


def prompts(source: Path) -> list[dict]:
    rows, seen = [], set()
    for line in source.read_text().splitlines():
        messages = json.loads(line)["messages"]
        system = next((m["content"] for m in messages if m["role"] == "system"), None)
        for message in messages:
            key = (system, message["content"])
            if message["role"] != "user" or key in seen:
                continue
            seen.add(key)
            rows.append({"prompt": message["content"], **({"system": system} if system else {})})
    return rows


def main() -> None:
    for source, target in (("velmora_train.jsonl", "velmora_prompts_train.jsonl"),
                           ("velmora_eval.jsonl", "velmora_prompts_eval.jsonl")):
        rows = prompts(HERE / source)
        (HERE / target).write_text("".join(json.dumps(row) + "\n" for row in rows))
        print(f"{target}: {len(rows)} prompts")


if __name__ == "__main__":
    main()
