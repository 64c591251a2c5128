"""Chat messages as a prompt: rendered with the model's own chat template.

Torch-free (the daemon builds ``ChatPrompt`` and sends it to its engine); the rendering only needs
a Hugging Face tokenizer, passed in by the engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from scheduler.errors import InvalidRequestError

# apply_chat_template's own parameters: as chat_template_kwargs they would change how Helix
# renders (or collide with what it passes), not fill template variables.
RESERVED_TEMPLATE_KWARGS = frozenset({
    "conversation", "chat_template", "add_generation_prompt", "continue_final_message",
    "tokenize", "padding", "truncation", "max_length", "return_tensors", "return_dict",
    "return_assistant_tokens_mask", "tokenizer_kwargs", "tools", "documents",
})


@dataclass(frozen=True, slots=True)
class ChatPrompt:
    """OpenAI-shaped messages (``{"role", "content"}``, already validated by the wire)."""

    messages: list[dict[str, str]]
    template_kwargs: dict[str, Any] = field(default_factory=dict)


def render_chat(tokenizer: Any, prompt: ChatPrompt) -> list[int]:
    """Token ids of ``prompt`` under the tokenizer's chat template, generation prompt added.

    The template writes any BOS itself, so the rendered text is tokenized without adding special
    tokens again (what ``apply_chat_template(tokenize=True)`` does: no double BOS).
    Raises InvalidRequestError when the model has no template or the template refuses."""
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidRequestError("this model has no chat template: send 'prompt' or "
                                  "'prompt_token_ids' instead of 'messages'")
    reserved = sorted(RESERVED_TEMPLATE_KWARGS & prompt.template_kwargs.keys())
    if reserved:
        raise InvalidRequestError(f"chat_template_kwargs may not set {', '.join(reserved)}")
    try:
        text = tokenizer.apply_chat_template(prompt.messages, add_generation_prompt=True,
                                             tokenize=False, **prompt.template_kwargs)
    except Exception as e:  # a template may raise anything (jinja's raise_exception included)
        raise InvalidRequestError(f"the chat template refused the messages: {e}") from e
    return list(tokenizer.encode(text, add_special_tokens=False))
