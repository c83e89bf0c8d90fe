"""Before/after measurements on held-out rows: response-token loss and answers to held-out questions."""

from __future__ import annotations

from dataclasses import dataclass

from tuneforge.config import DataConfig
from tuneforge.data.readers import Row, read_rows
from tuneforge.data.dataset import DataReport, load_conversations, make_batches, tokenize_conversations
from tuneforge.engine.step import evaluate_loss
from tuneforge.eval.metrics import contains, exact_match
from tuneforge.inference import Generator


@dataclass
class HeldoutResult:
    loss: float
    perplexity: float
    exact_match: float
    contains: float
    answers: list[str]


def evaluate_heldout(generator: Generator, path: str, data: DataConfig, answer_field: str = "answer",
                     max_new_tokens: int = 48, batch_size: int = 8) -> HeldoutResult:
    """Loss on the responses of ``path`` (same masking as training) and greedy answers to its questions.

    Each row's last assistant message is the reference for exact match; the row's ``answer_field`` (when
    present) is the short answer for the ``contains`` metric, otherwise the reference itself.
    """
    report = DataReport()
    conversations = load_conversations(path, data, report)
    examples = tokenize_conversations(conversations, generator.template, generator.tokenizer, data, report)
    batches = make_batches(examples, batch_size, generator.tokenizer.pad_token_id)
    loss = evaluate_loss(generator.model, batches, generator.device)

    fields = {row.number: row.fields for row in read_rows(path) if isinstance(row, Row)}
    prompts, references, short = [], [], []
    for conversation in conversations:
        row = fields[conversation.row]
        last = max(i for i, m in enumerate(conversation.messages) if m.role == "assistant")
        prompts.append(conversation.messages[:last])
        references.append(conversation.messages[last].content)
        short.append(row.get(answer_field) or conversation.messages[last].content)
    answers = generator.generate(prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    count = len(answers)
    return HeldoutResult(
        loss=loss["loss"], perplexity=loss["perplexity"],
        exact_match=sum(exact_match(a, r) for a, r in zip(answers, references)) / count,
        contains=sum(contains(a, s) for a, s in zip(answers, short)) / count,
        answers=answers)
