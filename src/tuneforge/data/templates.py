"""Chat templates that render a conversation as a list of text segments, each marked trained or not.

Loss masks come from these segments: each segment is tokenised on its own and its tokens inherit its flag,
so a mask never depends on searching the rendered text for a marker. What is trained for an assistant turn is
its content plus the end-of-turn token that closes it (so the model learns to stop); the header before it and
any separator after the end-of-turn token are not. Adjacent untrained pieces are one segment (:func:`joined`),
so untrained text tokenises as it does in a whole rendering; :meth:`Template.chat_template` writes a template
as a Hugging Face chat template, which merge and export give the models they write.

Templates:
- ``alpaca``: the original Stanford Alpaca prompt, with and without ``### Input:``.
- ``chatml``: ``<|im_start|>role\\ncontent<|im_end|>\\n``.
- ``simple``: ``User: ...`` / ``Assistant: ...`` lines.
- ``tokenizer``: the tokenizer's own Jinja chat template; also any Jinja file given by path.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from pathlib import Path

from tuneforge.data.formats import Conversation, Message
from tuneforge.errors import TemplateError

BUILTIN = ("alpaca", "chatml", "simple")
# End-of-turn strings used by common chat templates; the first one found after a response closes it.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "</s>")


@dataclass
class Segment:
    """A piece of rendered text; ``trained`` pieces contribute to the loss."""

    text: str
    trained: bool
    # Index of the assistant message this trained segment belongs to (-1 for untrained pieces).
    response: int = -1


def joined(segments: list[Segment]) -> list[Segment]:
    """``segments`` without empty ones, each run of adjacent untrained segments joined into one.

    Untrained text is then tokenised the way a chat template's whole rendering is (by transformers, vLLM,
    llama.cpp): tokenised apart, alpaca's ``"...\\n\\n"`` + ``"### Instruction"`` gives ``ĊĊ ###``, ids that no
    tokenisation of the joined text produces (``Ċ Ċ ###``), so a served model could never be prompted with them.
    """
    out: list[Segment] = []
    for segment in segments:
        if not segment.text:
            continue
        if out and not segment.trained and not out[-1].trained:
            out[-1] = Segment(out[-1].text + segment.text, False)
        else:
            out.append(segment)
    return out


class Template:
    """Base class: subclasses implement :meth:`segments` and :meth:`chat_template`."""

    name: str = ""

    def segments(self, conversation: Conversation, add_generation_prompt: bool = False) -> list[Segment]:
        """Render ``conversation``; with ``add_generation_prompt`` append the assistant header for generation."""
        raise NotImplementedError

    def prompt_text(self, messages: list[Message]) -> str:
        """The text a model continues to answer the last user message."""
        return "".join(s.text for s in self.segments(Conversation(list(messages)), add_generation_prompt=True))

    def stop_strings(self) -> list[str]:
        """Strings that end an assistant turn during generation."""
        return []

    def to_dict(self) -> dict:
        return {"name": self.name}

    def chat_template(self) -> str:
        """A Hugging Face chat template (Jinja source) rendering exactly the text of :meth:`segments`, for the
        tokenizer of a merged or exported model; it renders the dicts of :meth:`chat_messages`."""
        raise NotImplementedError

    def chat_messages(self, messages: list[Message]) -> list[dict]:
        """``messages`` as the ``{"role", "content"}`` dicts that :meth:`chat_template` renders."""
        return [{"role": m.role, "content": m.full_content()} for m in messages]


class FormatTemplate(Template):
    """A template given by format strings; ``{eos}`` stands for the tokenizer's EOS token. When the tokenizer
    starts plain text with a BOS token (Llama-style), every rendering starts with it too, untrained."""

    def __init__(self, name: str, *, system: str, user: str, assistant_header: str, assistant_end: str,
                 separator: str, default_system: str = "", user_with_context: str | None = None,
                 response_prefix: str = ""):
        self.name = name
        self.system = system
        self.user = user
        self.user_with_context = user_with_context
        self.assistant_header = assistant_header
        self.assistant_end = assistant_end
        self.separator = separator
        # Text the model writes before the content (part of the trained segment, not of the header).
        self.response_prefix = response_prefix
        self.default_system = default_system
        self.eos = ""
        self.bos = ""

    def bind(self, eos_token: str, bos_token: str = "") -> "FormatTemplate":
        self.eos = eos_token
        self.bos = bos_token
        return self

    def _user_text(self, message: Message) -> str:
        if message.context and self.user_with_context is not None:
            return self.user_with_context.format(content=message.content, context=message.context)
        return self.user.format(content=message.full_content())

    def segments(self, conversation: Conversation, add_generation_prompt: bool = False) -> list[Segment]:
        messages = conversation.messages
        out: list[Segment] = [Segment(self.bos, False)]
        system_text = ""
        start = 0
        if messages and messages[0].role == "system":
            system_text = messages[0].content
            start = 1
        elif self.name == "alpaca":
            # Alpaca's preamble depends on whether the first instruction has an input.
            first_user = next((m for m in messages if m.role == "user"), None)
            system_text = ALPACA_PREAMBLE_INPUT if first_user and first_user.context else ALPACA_PREAMBLE
        else:
            system_text = self.default_system
        if system_text:
            out.append(Segment(self.system.format(content=system_text), False))
        for index in range(start, len(messages)):
            message = messages[index]
            if message.role == "user":
                out.append(Segment(self._user_text(message), False))
            elif message.role == "assistant":
                out.append(Segment(self.assistant_header, False))
                end = self.assistant_end.format(eos=self.eos)
                trained = message.trained
                out.append(Segment(self.response_prefix + message.content + end, trained,
                                   response=index if trained else -1))
                out.append(Segment(self.separator, False))
            else:
                raise TemplateError(f"template {self.name}: a system message may only come first")
        if add_generation_prompt:
            out.append(Segment(self.assistant_header, False))
        return joined(out)

    def stop_strings(self) -> list[str]:
        end = self.assistant_end.format(eos=self.eos)
        return [end] if end else []

    def chat_messages(self, messages: list[Message]) -> list[dict]:
        """Alpaca's ``input`` (``Message.context``) stays a key of its own, so the chat template can give it its
        ``### Input:`` section as training did."""
        return [{"role": m.role, "content": m.content, **({"input": m.context} if m.context else {})}
                for m in messages]

    def chat_template(self) -> str:
        """:meth:`segments` in Jinja, statement for statement, with this tokenizer's BOS and EOS written out."""
        has_input = "message['input'] is defined and message['input']"
        user = _jinja_format(self.user, content="message['content']")
        if self.user_with_context is not None:
            with_input = _jinja_format(self.user_with_context, content="message['content']", context="message['input']")
            user = f"({with_input}) if {has_input} else ({user})"
        else:  # Message.full_content: the input after the content
            user = _jinja_format(self.user, content=f"message['content'] + ('\\n\\n' + message['input'] if {has_input} "
                                                    "else '')")
        default_system = _jinja_string(self.default_system)
        if self.name == "alpaca":
            # The preamble depends on whether the first instruction has an input (as in segments()).
            default_system = (f"{_jinja_string(ALPACA_PREAMBLE_INPUT)} if users and users[0]['input'] is defined "
                              f"and users[0]['input'] else {_jinja_string(ALPACA_PREAMBLE)}")
        assistant = (f"{_jinja_string(self.assistant_header + self.response_prefix)} + message['content'] + "
                     f"{_jinja_string(self.assistant_end.format(eos=self.eos) + self.separator)}")
        lines = [
            f"{{#- tuneforge template {self.name}: the rendering this model was trained on -#}}",
            "{%- set users = messages | selectattr('role', 'equalto', 'user') | list %}" if self.name == "alpaca"
            else "",
            "{%- if messages and messages[0]['role'] == 'system' %}",
            "{%- set system_text = messages[0]['content'] %}{%- set rest = messages[1:] %}",
            "{%- else %}",
            f"{{%- set system_text = {default_system} %}}{{%- set rest = messages %}}",
            "{%- endif %}",
            f"{{{{- {_jinja_string(self.bos)} }}}}" if self.bos else "",
            f"{{%- if system_text %}}{{{{- {_jinja_format(self.system, content='system_text')} }}}}{{%- endif %}}",
            "{%- for message in rest %}",
            f"{{%- if message['role'] == 'user' %}}{{{{- {user} }}}}",
            f"{{%- elif message['role'] == 'assistant' %}}{{{{- {assistant} }}}}",
            f"{{%- else %}}{{{{- raise_exception('template {self.name}: a system message may only come first') }}}}",
            "{%- endif %}",
            "{%- endfor %}",
            f"{{%- if add_generation_prompt %}}{{{{- {_jinja_string(self.assistant_header)} }}}}{{%- endif %}}",
        ]
        return "\n".join(line for line in lines if line)


ALPACA_PREAMBLE = ("Below is an instruction that describes a task. "
                   "Write a response that appropriately completes the request.")
ALPACA_PREAMBLE_INPUT = ("Below is an instruction that describes a task, paired with an input that provides "
                         "further context. Write a response that appropriately completes the request.")


JINJA_ESCAPES = {"\\": "\\\\", "'": "\\'", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _jinja_string(text: str) -> str:
    """``text`` as a Jinja string literal (Jinja reads Python's escapes)."""
    return "'" + "".join(JINJA_ESCAPES.get(char, char) for char in text) + "'"


def _jinja_format(pattern: str, **fields: str) -> str:
    """A Jinja expression for ``pattern.format(...)``: its literal pieces as strings, each ``{field}`` as the
    Jinja expression ``fields[field]``, joined with ``+``."""
    parts = []
    for literal, field, _, _ in string.Formatter().parse(pattern):
        if literal:
            parts.append(_jinja_string(literal))
        if field is not None:
            parts.append(f"({fields[field]})")
    return " + ".join(parts) or "''"


def _alpaca() -> FormatTemplate:
    return FormatTemplate(
        "alpaca", system="{content}\n\n", user="### Instruction:\n{content}\n\n",
        user_with_context="### Instruction:\n{content}\n\n### Input:\n{context}\n\n",
        assistant_header="### Response:\n", assistant_end="{eos}", separator="\n\n")


def _chatml() -> FormatTemplate:
    return FormatTemplate(
        "chatml", system="<|im_start|>system\n{content}<|im_end|>\n", user="<|im_start|>user\n{content}<|im_end|>\n",
        assistant_header="<|im_start|>assistant\n", assistant_end="<|im_end|>", separator="\n")


def _simple() -> FormatTemplate:
    # The space after "Assistant:" belongs to the response, so generation continues "Assistant:" naturally.
    return FormatTemplate(
        "simple", system="{content}\n\n", user="User: {content}\n", assistant_header="Assistant:",
        assistant_end="{eos}", separator="\n", response_prefix=" ")


class JinjaTemplate(Template):
    """The tokenizer's chat template (or a Jinja file), split per message by rendering growing prefixes.

    Rendering messages[:i] and messages[:i+1] gives the text of message i as the difference; for an assistant
    message, rendering messages[:i] with the generation prompt separates the header from the response. This
    works for any template whose render of a prefix is a prefix of the full render; others raise a clear error.
    """

    def __init__(self, tokenizer, source: str, jinja: str | None = None):
        self.tokenizer = tokenizer
        self.name = source
        self.jinja = jinja if jinja is not None else tokenizer.chat_template
        if not self.jinja:
            raise TemplateError("the tokenizer has no chat template; set data.template to chatml, alpaca or simple")
        self.end_markers = [t for t in END_OF_TURN_TOKENS if t in self.jinja or t == tokenizer.eos_token]

    def _render(self, messages: list[Message], add_generation_prompt: bool) -> str:
        try:
            return self.tokenizer.apply_chat_template(self.chat_messages(messages), chat_template=self.jinja,
                                                      tokenize=False,
                                                      add_generation_prompt=add_generation_prompt)
        except Exception as exc:  # jinja raises its own exception types, e.g. for non-alternating roles
            raise TemplateError(f"chat template {self.name} failed to render a conversation: {exc}") from None

    def _unstable(self, what: str) -> TemplateError:
        return TemplateError(
            f"chat template {self.name} is not prefix-stable ({what}), so per-message loss masks cannot be "
            "derived from it; set data.template to chatml, alpaca or simple")

    def segments(self, conversation: Conversation, add_generation_prompt: bool = False) -> list[Segment]:
        messages = conversation.messages
        out: list[Segment] = []
        previous = ""
        for index, message in enumerate(messages):
            if message.role == "assistant":
                head = self._render(messages[:index], add_generation_prompt=True)
                full = self._render(messages[: index + 1], add_generation_prompt=False)
                if not head.startswith(previous) or not full.startswith(head):
                    raise self._unstable(f"message {index}")
                out.append(Segment(head[len(previous):], False))
                body = full[len(head):]
                content = message.content.strip()
                found = body.find(content)
                if found < 0:
                    raise self._unstable(f"the response of message {index} does not appear after its header")
                after = found + len(content)
                end = len(body)
                hits = [body.find(m, after) for m in self.end_markers if body.find(m, after) >= 0]
                if hits:
                    first = min(hits)
                    marker = next(m for m in self.end_markers if body.find(m, after) == first)
                    end = first + len(marker)
                trained = message.trained
                out.append(Segment(body[:end], trained, response=index if trained else -1))
                out.append(Segment(body[end:], False))
            else:
                full = self._render(messages[: index + 1], add_generation_prompt=False)
                if not full.startswith(previous):
                    raise self._unstable(f"message {index}")
                out.append(Segment(full[len(previous):], False))
            previous = full
        if add_generation_prompt:
            final = self._render(messages, add_generation_prompt=True)
            if not final.startswith(previous):
                raise self._unstable("generation prompt")
            out.append(Segment(final[len(previous):], False))
        return joined(out)

    def stop_strings(self) -> list[str]:
        return list(self.end_markers)

    def to_dict(self) -> dict:
        return {"name": self.name, "jinja": self.jinja}

    def chat_template(self) -> str:
        return self.jinja


def load_template(spec: str, tokenizer) -> Template:
    """Resolve ``data.template``: a builtin name, ``tokenizer``, ``auto`` or a path to a Jinja file."""
    if spec == "auto":
        spec = "tokenizer" if getattr(tokenizer, "chat_template", None) else "chatml"
    if spec == "tokenizer":
        return JinjaTemplate(tokenizer, "tokenizer")
    if spec in BUILTIN:
        template = {"alpaca": _alpaca, "chatml": _chatml, "simple": _simple}[spec]()
        return template.bind(tokenizer.eos_token or "", _default_bos(tokenizer))
    path = Path(spec)
    if path.suffix in (".jinja", ".j2", ".jinja2") or path.exists():
        if not path.is_file():
            raise TemplateError(f"data.template: template file {path} does not exist")
        return JinjaTemplate(tokenizer, str(path), path.read_text(encoding="utf-8"))
    raise TemplateError(f"data.template: unknown template {spec!r}; use auto, tokenizer, {', '.join(BUILTIN)}, "
                        "or the path of a .jinja file")


def _default_bos(tokenizer) -> str:
    """The BOS token if the tokenizer adds one to plain text by default, else "" (templates are tokenised without
    special tokens, so a model that expects BOS only gets it when the template writes it)."""
    bos_id = getattr(tokenizer, "bos_token_id", None)
    if bos_id is None:
        return ""
    return tokenizer.bos_token if tokenizer("a")["input_ids"][:1] == [bos_id] else ""


def template_from_dict(values: dict, tokenizer) -> Template:
    """Rebuild a template saved in a run directory (``template.json``)."""
    if "jinja" in values:
        return JinjaTemplate(tokenizer, values["name"], values["jinja"])
    return load_template(values["name"], tokenizer)
