"""What the route modules' stream bodies are fed in their tests: a text service that plays a scripted reply,
and its outcome."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

from tp_ollama.server.schemas import Metrics
from tp_ollama.server.text_service import Outcome
from tp_ollama.text.reply import Piece

METRICS = Metrics("stop", 10, 1, 3, 4, 5, 6)  # 3 prompt tokens, 5 generated
OUTCOME = Outcome(METRICS, [1, 2, 3])


class ScriptedText:
    """The one method of TextService that the stream bodies call: `stream` yields the given pieces and outcome,
    or raises `error` after the pieces."""

    def __init__(self, items: Sequence[Piece | Outcome], error: Exception | None = None) -> None:
        self.items = items
        self.error = error

    async def stream(self, job: Any, lease: Any) -> AsyncIterator[Piece | Outcome]:
        for item in self.items:
            yield item
        if self.error is not None:
            raise self.error


async def collected(body: AsyncIterator[bytes]) -> list[bytes]:
    return [part async for part in body]
