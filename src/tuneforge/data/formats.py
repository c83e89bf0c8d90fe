"""Row formats: turn one row of a file into a :class:`Conversation`, validating every field it reads.

Supported layouts (detected from the row's keys unless ``data.format`` names one):

- ``alpaca``: ``instruction``, optional ``input``, ``output``
- ``sharegpt``: ``conversations`` = list of ``{"from": human|gpt|system, "value": ...}``
- ``messages``: OpenAI style ``messages`` = list of ``{"role": system|user|assistant, "content": ...}``
- ``prompt_completion``: ``prompt`` and ``completion``, each a string or a list of messages
- ``text``: plain ``text``; every token is trained
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from tuneforge.errors import DataError

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant", "chatgpt": "assistant", "bing": "assistant", "bard": "assistant"}


@dataclass
class Message:
    """One turn. ``context`` holds alpaca's optional ``input`` so the alpaca template can render it in its own
    section; other templates append it to ``content``. ``trained`` is False for assistant turns that are part
    of a prompt (earlier turns of a ``prompt_completion`` prompt): they are rendered but not learned."""

    role: str
    content: str
    context: str | None = None
    trained: bool = True

    def full_content(self) -> str:
        return self.content if not self.context else f"{self.content}\n\n{self.context}"


@dataclass
class Conversation:
    """The messages of one row; ``is_plain_text`` marks rows of the ``text`` format (no template, all trained)."""

    messages: list[Message]
    source: str = ""
    row: int = 0
    is_plain_text: bool = False
    extra: dict = field(default_factory=dict)


class _Checker:
    """Field access that raises a :class:`DataError` naming file, row and field."""

    def __init__(self, path: str, row: int):
        self.path = path
        self.row = row

    def fail(self, field_name: str | None, message: str, reason: str) -> DataError:
        return DataError(self.path, self.row, field_name, message, reason)

    def string(self, fields: dict, name: str, *, label: str | None = None, required: bool = True,
               allow_empty: bool = False, empty_reason: str = "empty_field") -> str | None:
        label = label or name
        if name not in fields or fields[name] is None:
            if required:
                raise self.fail(label, "missing required field", "missing_field")
            return None
        value = fields[name]
        if not isinstance(value, str):
            raise self.fail(label, f"expected a string, got {type(value).__name__}", "wrong_type")
        if not allow_empty and not value.strip():
            raise self.fail(label, "is empty", empty_reason)
        return value

    def message_list(self, fields: dict, name: str, role_key: str, content_key: str,
                     role_map: dict[str, str]) -> list[Message]:
        if name not in fields or fields[name] is None:
            raise self.fail(name, "missing required field", "missing_field")
        value = fields[name]
        if not isinstance(value, list):
            raise self.fail(name, f"expected a list of messages, got {type(value).__name__}", "wrong_type")
        messages = []
        for index, item in enumerate(value):
            label = f"{name}[{index}]"
            if not isinstance(item, dict):
                raise self.fail(label, f"expected an object, got {type(item).__name__}", "wrong_type")
            role = self.string(item, role_key, label=f"{label}.{role_key}")
            if role not in role_map:
                known = ", ".join(sorted(set(role_map)))
                raise self.fail(f"{label}.{role_key}", f"unknown role {role!r} (known roles: {known})",
                                "unknown_role")
            role = role_map[role]
            content = self.string(item, content_key, label=f"{label}.{content_key}",
                                  allow_empty=role != "assistant", empty_reason="empty_response")
            messages.append(Message(role, content))
        return messages


def _check_structure(messages: list[Message], check: _Checker, name: str) -> list[Message]:
    if not messages:
        raise check.fail(name, "has no messages", "empty_conversation")
    for index, message in enumerate(messages):
        if message.role == "system" and index != 0:
            raise check.fail(f"{name}[{index}]", "a system message may only come first", "misplaced_system")
    if not any(m.role == "assistant" and m.trained for m in messages):
        raise check.fail(name, "has no assistant message to learn from", "no_response")
    first_turn = 1 if messages[0].role == "system" else 0
    if first_turn < len(messages) and messages[first_turn].role == "assistant":
        raise check.fail(f"{name}[{first_turn}]", "the conversation starts with an assistant message; "
                         "it needs a user message before it", "no_prompt")
    return messages


def _alpaca(fields: dict, check: _Checker) -> list[Message]:
    instruction = check.string(fields, "instruction")
    context = check.string(fields, "input", required=False, allow_empty=True)
    output = check.string(fields, "output", empty_reason="empty_response")
    messages = []
    # An empty optional system field (common in exported datasets) means "no system message".
    system = check.string(fields, "system", required=False, allow_empty=True)
    if system:
        messages.append(Message("system", system))
    messages += [Message("user", instruction, context or None), Message("assistant", output)]
    return messages


def _sharegpt(fields: dict, check: _Checker) -> list[Message]:
    messages = check.message_list(fields, "conversations", "from", "value", SHAREGPT_ROLES)
    return _check_structure(messages, check, "conversations")


def _messages(fields: dict, check: _Checker) -> list[Message]:
    messages = check.message_list(fields, "messages", "role", "content", {r: r for r in ROLES})
    return _check_structure(messages, check, "messages")


def _prompt_completion(fields: dict, check: _Checker) -> list[Message]:
    roles = {r: r for r in ROLES}
    if isinstance(fields.get("prompt"), list):
        prompt = check.message_list(fields, "prompt", "role", "content", roles)
        if not prompt:
            raise check.fail("prompt", "has no messages", "empty_conversation")
        # Only the completion is learned; assistant turns inside the prompt are context.
        for message in prompt:
            message.trained = False
    else:
        prompt = [Message("user", check.string(fields, "prompt"))]
    if isinstance(fields.get("completion"), list):
        completion = check.message_list(fields, "completion", "role", "content", roles)
        if not completion:
            raise check.fail("completion", "has no messages", "empty_response")
        for index, message in enumerate(completion):
            if message.role != "assistant":
                raise check.fail(f"completion[{index}].role", "completion messages must be assistant messages",
                                 "unknown_role")
    else:
        completion = [Message("assistant", check.string(fields, "completion", empty_reason="empty_response"))]
    return _check_structure(prompt + completion, check, "prompt")


def _text(fields: dict, check: _Checker) -> list[Message]:
    return [Message("assistant", check.string(fields, "text"))]


CONVERTERS: dict[str, Callable[[dict, _Checker], list[Message]]] = {
    "alpaca": _alpaca,
    "sharegpt": _sharegpt,
    "messages": _messages,
    "prompt_completion": _prompt_completion,
    "text": _text,
}

# Checked in this order: the first format whose key is present wins.
_SIGNATURES = [("messages", "messages"), ("conversations", "sharegpt"), ("instruction", "alpaca"),
               ("completion", "prompt_completion"), ("text", "text")]


def detect_format(fields: dict) -> str | None:
    """The format whose signature key the row has, or None."""
    for key, name in _SIGNATURES:
        if key in fields:
            return name
    return None


def to_conversation(fields: dict, fmt: str, path: str, row: int, system_prompt: str | None = None) -> Conversation:
    """Convert one row; raises :class:`DataError` for anything wrong with it."""
    check = _Checker(path, row)
    if fmt == "auto":
        detected = detect_format(fields)
        if detected is None:
            keys = ", ".join(sorted(fields)) or "none"
            raise check.fail(None, f"cannot tell the row format from its keys ({keys}); expected one of "
                             "messages, conversations, instruction/output, prompt/completion, text "
                             "(or set data.format)", "unknown_format")
        fmt = detected
    messages = CONVERTERS[fmt](fields, check)
    is_text = fmt == "text"
    if system_prompt and not is_text and messages[0].role != "system":
        messages.insert(0, Message("system", system_prompt))
    return Conversation(messages, source=path, row=row, is_plain_text=is_text)
