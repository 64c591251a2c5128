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
        """The same events, those that arrived together as one list: a reader that lags behind
        (a burst) catches up in fewer, larger writes instead of one per event. One choice (the
        usual request) is read in this task: a task of its own would cost every token a hop
        through the event loop."""
        if len(self._open) == 1:
            [index] = self._open
            stream = self.client.stream_batches(self.request_ids[index])
            async with contextlib.aclosing(stream):  # closed with this one, not when collected
                async for events in stream:
                    yield self._noted(index, events)
            return
        async with contextlib.aclosing(self._merged()) as merged:
            async for batch in merged:
                yield batch

    async def _merged(self) -> AsyncGenerator[list[ChoiceEvent], None]:
        """Several choices: one reader task each, their lists merged as they arrive."""
        inbox: asyncio.Queue[tuple[int, list[Event]] | BaseException] = asyncio.Queue()

        async def pump(index: int) -> None:
            try:
                async for events in self.client.stream_batches(self.request_ids[index]):
                    inbox.put_nowait((index, events))
            except Exception as e:  # handed to the consumer, which raises it
                inbox.put_nowait(e)

        tasks = [asyncio.create_task(pump(i)) for i in sorted(self._open)]
        try:
            while self._open:
                items = [await inbox.get()]
                while not inbox.empty():
                    items.append(inbox.get_nowait())
                batch: list[ChoiceEvent] = []
                for item in items:
                    if isinstance(item, BaseException):
                        raise item
                    batch += self._noted(*item)
                yield batch
        finally:
            for task in tasks:
                task.cancel()

    def _noted(self, index: int, events: list[Event]) -> list[ChoiceEvent]:
        """``events`` of choice ``index`` with their choice; a terminal one (always the last)
        closes it."""
        if is_terminal(events[-1]):
            self._open.discard(index)
        choice = self.choices[index]
        return [(choice, event) for event in events]

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
