"""Each request's random stream: the target's sampling and the draft model's draw from it."""

from __future__ import annotations

import torch

from scheduler.sampling import make_generator


class RequestGenerators:
    """A seeded request's own generator (so it reproduces), and the stream the others share."""

    def __init__(self, device: torch.device, seed: int) -> None:
        self.device = device
        self.default = torch.Generator(device=device).manual_seed(seed)  # unseeded requests
        self._by_request: dict[str, torch.Generator | None] = {}

    def add(self, request_id: str, seed: int | None) -> None:
        self._by_request[request_id] = make_generator(seed, self.device)

    def drop(self, request_id: str) -> None:
        self._by_request.pop(request_id, None)

    def __getitem__(self, request_id: str) -> torch.Generator | None:
        """The request's generator; None: it draws from ``default``."""
        return self._by_request[request_id]

    def get(self, request_id: str) -> torch.Generator | None:
        """As ``[]``, but an unknown request draws from ``default`` too."""
        return self._by_request.get(request_id)
