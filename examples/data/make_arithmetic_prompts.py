"""Write the GRPO demo's prompts: additions of two numbers, with the sum as the row's ``answer``.

Fixed seed: rerunning gives the same files. No held-out pair (in either order) appears in the training prompts.

    python examples/data/make_arithmetic_prompts.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).parent
TRAIN, HELD_OUT = 256, 48
LOW, HIGH = 2, 39


def main() -> None:
    rng = random.Random(7)
    pairs = sorted({tuple(sorted((a, b))) for a in range(LOW, HIGH + 1) for b in range(LOW, HIGH + 1)})
    rng.shuffle(pairs)
    held_out, train = pairs[:HELD_OUT], pairs[HELD_OUT:HELD_OUT + TRAIN]
    for name, chosen in (("arithmetic_train.jsonl", train), ("arithmetic_eval.jsonl", held_out)):
        rows = []
        for a, b in chosen:
            if rng.random() < 0.5:
                a, b = b, a
            rows.append({"prompt": f"What is {a} + {b}?", "answer": str(a + b)})
        (HERE / name).write_text("".join(json.dumps(row) + "\n" for row in rows))


if __name__ == "__main__":
    main()
