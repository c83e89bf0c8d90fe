"""Write the online DPO demo's prompts: the Velmora questions, each with its fact's short answer as ``answer``
(for the judge; the model never sees it).

``velmora_qa_prompts_train.jsonl``: every row of ``velmora_train.jsonl`` as its turns up to the last question (a
``prompt`` list of messages, system message included); its ``answer`` is the short answer of the fact that row's
last reply states, read from ``velmora_eval.jsonl``, whose replies use the same one sentence per fact.
``velmora_qa_prompts_eval.jsonl``: the 36 held-out questions of ``velmora_eval.jsonl`` with their ``answer``.
Rerunning gives the same files.

    python examples/data/make_velmora_qa_prompts.py
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).parent


def read(name: str) -> list[dict]:
    return [json.loads(line) for line in (HERE / name).read_text().splitlines() if line.strip()]


def main() -> None:
    held_out = read("velmora_eval.jsonl")
    answers = {row["messages"][-1]["content"]: row["answer"] for row in held_out}
    train = [{"prompt": row["messages"][:-1], "answer": answers[row["messages"][-1]["content"]]}
             for row in read("velmora_train.jsonl")]
    evaluation = [{"prompt": row["messages"][-2]["content"], "answer": row["answer"]} for row in held_out]
    for name, rows in (("velmora_qa_prompts_train.jsonl", train), ("velmora_qa_prompts_eval.jsonl", evaluation)):
        (HERE / name).write_text("".join(json.dumps(row) + "\n" for row in rows))
        print(f"{name}: {len(rows)} prompts")


if __name__ == "__main__":
    main()
