"""What a request asks for: sampling settings and stop conditions, validated once."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Literal

from scheduler.errors import InvalidRequestError

ConstraintKind = Literal["json_object", "json_schema", "regex", "grammar"]


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How the next token is drawn. ``temperature == 0`` means greedy (argmax)."""

    temperature: float = 1.0
    top_k: int = 0  # 0 disables
    top_p: float = 1.0  # 1.0 disables
    min_p: float = 0.0  # 0.0 disables
    seed: int | None = None

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self) -> None:
        if not self.temperature >= 0.0:
            raise InvalidRequestError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise InvalidRequestError(f"top_k must be >= 0 (0 disables), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0.0 <= self.min_p <= 1.0:
            raise InvalidRequestError(f"min_p must be in [0, 1], got {self.min_p}")


@dataclass(frozen=True, slots=True)
class OutputConstraint:
    """What the output must match: any JSON object, a JSON schema (as JSON text), a regular
    expression or a Lark grammar. Its compiled form is cached by ``key``."""

    kind: ConstraintKind
    source: str = ""  # the schema's JSON text, the regex or the grammar; empty for json_object

    @property
    def key(self) -> str:
        """Identifies the compiled grammar: the same kind and source compile once."""
        return hashlib.sha256(f"{self.kind}\0{self.source}".encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class RequestParams:
    """Everything about one generation request except its prompt."""

    max_tokens: int = 16
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    priority: int = 0  # lower runs first, as in vLLM
    num_speculative_tokens: int | None = None  # per-request K override; 0 disables speculation
    prefix_caching: bool = True  # False: neither reuse cached prefix blocks nor offer its own
    cache_salt: str | None = None  # blocks hit only requests with the same salt (tenants)
    constraint: OutputConstraint | None = None  # structured output (JSON, regex, grammar)

    @property
    def cache_key(self) -> bytes | None:
        """The extra key of this request's block hashes; None when it opts out of caching."""
        if not self.prefix_caching:
            return None
        return b"" if self.cache_salt is None else b"salt:" + self.cache_salt.encode()

    def validate(self) -> None:
        if self.max_tokens < 1:
            raise InvalidRequestError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if any(not s for s in self.stop):
            raise InvalidRequestError("stop strings must be non-empty")
        if self.num_speculative_tokens is not None and self.num_speculative_tokens < 0:
            raise InvalidRequestError("num_speculative_tokens must be >= 0")
        self.sampling.validate()
