"""Which agent image to inject: a configured one, or the answer of an image-resolver URL (the
"SystemA" of the 2.6 release notes), asked once and then cached for the life of the manager."""

from __future__ import annotations

import asyncio
import logging

import aiohttp
import msgspec

from tpcontrol.manager.prepare import PrepareError

log = logging.getLogger("tpcontrol.manager.images")


class PreferredImage(msgspec.Struct, frozen=True):
    """The resolver's answer: `{"image": "registry/name:tag"}`."""

    image: str


class ImageResolver:
    """Asks `url` (when given) once; until it answers, `default` is used and nothing is cached."""

    def __init__(self, default: str, url: str | None = None, timeout: float = 5.0) -> None:
        self.default = default
        self.url = url
        self.timeout = timeout
        self.calls = 0
        self._cached: str | None = None if url else default
        self._lock = asyncio.Lock()

    async def resolve(self, *, required: bool = False) -> str:
        """The agent image; with `required` a failing resolver is an error, else the default."""
        if self._cached is not None:
            return self._cached
        async with self._lock:  # many prepares at once ask the resolver once
            if self._cached is not None:
                return self._cached
            try:
                image = await self._ask()
            except (aiohttp.ClientError, TimeoutError, msgspec.DecodeError, ValueError) as exc:
                message = f"image resolver {self.url} failed: {exc or type(exc).__name__}"
                if required:
                    raise PrepareError(message, "config") from None
                log.warning("%s; using %s", message, self.default)
                return self.default
            self._cached = image
            log.info("agent image %s (from %s)", image, self.url)
            return image

    async def _ask(self) -> str:
        assert self.url is not None
        self.calls += 1
        timeout = aiohttp.ClientTimeout(total=self.timeout)
        async with aiohttp.ClientSession(timeout=timeout) as session, session.get(self.url) as r:
            if r.status != 200:
                raise ValueError(f"status {r.status}")
            answer = msgspec.json.decode(await r.read(), type=PreferredImage)
        if not answer.image.strip():
            raise ValueError("empty image")
        return answer.image.strip()

    def forget(self) -> None:
        """Drop the cached answer (after an upgrade names a new image explicitly)."""
        self._cached = None if self.url else self.default
