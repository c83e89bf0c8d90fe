"""The teacher of distillation: a frozen second model whose next-token distributions the student learns.

The teacher is anything a model argument accepts (``default``, a Hugging Face folder or hub id, a ``.gguf`` file,
a tuneforge run directory of a LoRA or a full fine-tuning run), loaded without gradients and in eval mode (no
dropout). It reads the student's token ids, so it must share the student tokenizer's vocabulary: the same token
for every id (checked from the two tokenizers before any model loads), and an output head that scores every one of
those ids (checked once it is loaded). Heads may differ in padding rows beyond the tokenizer (Qwen's 0.5B and 7B
models do); the distributions are then compared over the tokenizer's ids, the first ``vocab_size`` logits of both.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from tuneforge.engine.step import decoder_hidden
from tuneforge.errors import ConfigError
from tuneforge.models.adapters import decoder_and_head
from tuneforge.models.loading import ModelSource, load_model, load_tokenizer, resolve_model


def vocabulary_difference(teacher: dict[str, int], student: dict[str, int]) -> str | None:
    """None when both tokenizers map every token to the same id, else a short account of how they differ."""
    if teacher == student:
        return None
    moved = [token for token, index in student.items() if teacher.get(token) != index]
    extra = [token for token in teacher if token not in student]
    example = (moved or extra)[0]
    return (f"the teacher's tokenizer has {len(teacher)} tokens and the student's {len(student)}; "
            f"{len(moved)} of the student's tokens have another id or none in the teacher's "
            f"(first: {example!r})")


class Teacher:
    """A frozen model to distil from.

    Args:
        spec: the model argument (``gkd.teacher``).
        key: the config key, for messages.
        dtype: the dtype its weights are loaded in.
        attn_implementation: its attention kernel.

    Attributes (after :meth:`load`): ``model`` (frozen, eval mode), ``head`` (its output head) and ``vocab_size``
    (how many logits of each head are compared: the smaller head's rows, which cover every tokenizer id).
    """

    def __init__(self, spec: str, key: str, dtype: str = "float32", attn_implementation: str = "sdpa"):
        self.spec, self.key, self.dtype, self.attn_implementation = spec, key, dtype, attn_implementation
        self._source: ModelSource | None = None
        self.model: torch.nn.Module | None = None
        self.head: torch.nn.Module | None = None
        self.vocab_size: int | None = None

    def resolve(self) -> ModelSource:
        """Where the teacher's weights are (a GGUF file is imported here, once); a reward model is refused."""
        if self._source is None:
            source = resolve_model(self.spec)
            if source.is_reward_model:
                raise ConfigError(f"{self.key}: {self.spec} is a reward model (a scalar head); a teacher must be a "
                                  "language model whose next-token distributions the student can learn")
            self._source = source
        return self._source

    def check_vocabulary(self, tokenizer) -> None:
        """Refuse a teacher whose tokenizer maps any token to another id than the student's ``tokenizer`` does
        (before any model loads)."""
        difference = vocabulary_difference(load_tokenizer(self.resolve()).get_vocab(), tokenizer.get_vocab())
        if difference is not None:
            raise ConfigError(f"{self.key}: {self.spec} does not share the student's vocabulary: {difference}. "
                              "Distillation compares the two next-token distributions token id by token id; pick a "
                              "teacher with the student's tokenizer (the same model family)")

    def load(self, device: torch.device, student_vocab: int, tokenizer_size: int,
             log: Callable[[str], None] = print) -> torch.nn.Module:
        """Load the teacher on ``device``, frozen and in eval mode; a LoRA run's adapter is merged into its (float)
        base, which is exact and spares the adapter's matmuls. Checks that both heads score every tokenizer id."""
        source = self.resolve()
        model = load_model(source, self.dtype, self.attn_implementation, device=device, head="lm")
        if source.adapter is not None and source.quantization is None:
            model = model.merge_and_unload()
        if source.quantization is None:  # a quantized base was placed on the device while loading
            model = model.to(device)
        self.model = model.requires_grad_(False).eval()
        _, self.head = decoder_and_head(self.model)
        teacher_vocab = self.head.weight.shape[0]
        self.vocab_size = min(teacher_vocab, student_vocab)
        if self.vocab_size < tokenizer_size:
            raise ConfigError(f"{self.key}: {self.spec} scores {teacher_vocab} tokens and the student "
                              f"{student_vocab}, but the tokenizer has {tokenizer_size}; both output heads must "
                              "cover every token id of the shared tokenizer")
        if teacher_vocab != student_vocab:
            log(f"note: the teacher's output head has {teacher_vocab} rows and the student's {student_vocab}: the "
                f"distributions are compared over the first {self.vocab_size} (every tokenizer id)")
        return self.model

    @torch.no_grad()
    def hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
               position_ids: torch.Tensor | None) -> torch.Tensor:
        """The teacher's last hidden states, (batch, seq, teacher hidden), without gradients."""
        return decoder_hidden(self.model, input_ids, attention_mask, position_ids)
