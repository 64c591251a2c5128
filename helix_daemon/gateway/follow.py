"""The queue entries of one HTTP request: submitted together, followed as one event sequence,
and cancelled together when the client goes away."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Sequence

from helix_daemon.client import AsyncHelixClient
from helix_daemon.gateway.translate import Choice
from helix_daemon.wire.protocol import Event, is_terminal

ChoiceEvent = tuple[Choice, Event]


class Submitted:
    """The entries of one request (one per choice), each followed to its terminal event."""

    def __init__(self, client: AsyncHelixClient, choices: Sequence[Choice],
                 request_ids: Sequence[str]) -> None:
        self.client = client
        self.choices = list(choices)
        self.request_ids = list(request_ids)
        self._open = set(range(len(self.choices)))  # choices without a terminal event yet

    @classmethod
    async def submit(cls, client: AsyncHelixClient, queue: str,
                     choices: Sequence[Choice]) -> Submitted:
        """Enqueue every choice (random ids: one round trip each, sent concurrently)."""
        ids = await asyncio.gather(*(client.submit(queue=queue, **c.body) for c in choices))
        return cls(client, choices, ids)

    async def events(self) -> AsyncGenerator[ChoiceEvent, None]:
        """Every choice's events as they arrive, each choice's in order, to the last terminal."""
        async for batch in self.batches():
            for item in batch:
                yield item

    async def batches(self) -> AsyncGenerator[list[ChoiceEvent], None]:
        """The same events, those that are ready together as one list: a reader that lags
        behind (a burst) catches up in fewer, larger writes instead of one per event."""
        inbox: asyncio.Queue[tuple[int, Event] | BaseException] = asyncio.Queue()

        async def pump(index: int) -> None:
            try:
                async for event in self.client.stream(self.request_ids[index]):
                    inbox.put_nowait((index, event))
            except Exception as e:  # handed to the consumer, which raises it
                inbox.put_nowait(e)

        tasks = [asyncio.create_task(pump(i)) for i in sorted(self._open)]
        remaining = len(tasks)
        try:
            while remaining:
                items = [await inbox.get()]
                while not inbox.empty():
                    items.append(inbox.get_nowait())
                batch = []
                for item in items:
                    if isinstance(item, BaseException):
                        raise item
                    index, event = item
                    self._note(index, event)
                    remaining -= is_terminal(event)
                    batch.append((self.choices[index], event))
                yield batch
        finally:
            for task in tasks:
                task.cancel()

    def _note(self, index: int, event: Event) -> None:
        if is_terminal(event):
            self._open.discard(index)

    @property
    def is_open(self) -> bool:
        return bool(self._open)

    async def cancel_open(self) -> int:
        """Cancel every choice that has not ended (its daemon frees its KV blocks at once);
        returns how many were cancelled."""
        open_ids = [self.request_ids[i] for i in sorted(self._open)]
        self._open.clear()
        for request_id in open_ids:
            with contextlib.suppress(Exception):  # best effort: the client is gone anyway
                await self.client.cancel(request_id)
        return len(open_ids)
