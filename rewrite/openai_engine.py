"""The `openai` engine: any OpenAI-compatible completions server (vLLM, SGLang, llama.cpp server).

Many requests in flight (`max_in_flight` per server), spread over every `--base-url` by whichever server
has a free slot; each request carries its own seed, so a caption's rewrites do not depend on the batch,
the server that served it or the order of arrival. Connection errors, 429 and 5xx answers are retried
with exponential backoff; a server that stays unreachable stops the run with an error naming it (the
pipeline has written only finished shards, so a re-run resumes where it stopped).
"""
from __future__ import annotations

import asyncio
import random

from .engine_base import MAX_NEW_TOKENS, TEMPERATURE, TOP_P, Engine, first_line

SEED_RANGE = 2**31  # servers take a 32-bit signed seed


class ServerError(RuntimeError):
    """A server failed for good (unreachable after the retries, or a 4xx answer)."""


class OpenAIEngine(Engine):
    name = "openai"
    uses_prompts = True

    def __init__(self, base_urls: list[str], model: str | None = None, max_in_flight: int = 64,
                 retries: int = 4, backoff_s: float = 0.5, timeout_s: float = 600.0):
        if not base_urls:
            raise ValueError("the openai engine needs at least one --base-url (e.g. http://127.0.0.1:8000/v1)")
        self.base_urls = [u.rstrip("/") for u in base_urls]
        self.max_in_flight = max_in_flight
        self.retries, self.backoff_s, self.timeout_s = retries, backoff_s, timeout_s
        self.model_id = model or self._served_model(self.base_urls[0])

    def _served_model(self, base_url: str) -> str:
        """The first model the server lists (what a single-model server such as `vllm serve` runs)."""
        import httpx
        try:
            reply = httpx.get(f"{base_url}/models", timeout=30)
            reply.raise_for_status()
            return reply.json()["data"][0]["id"]
        except (httpx.HTTPError, KeyError, IndexError, ValueError) as e:
            raise ServerError(f"openai engine: cannot list the models of {base_url} ({e!r}); "
                              "is the server running? (or pass --model NAME)") from e

    def generate(self, requests, n):
        return asyncio.run(self._generate_all(requests, n))

    async def _generate_all(self, requests, n):
        import httpx
        results: list[list[str] | None] = [None] * len(requests)
        queue: asyncio.Queue = asyncio.Queue()
        for item in enumerate(requests):
            queue.put_nowait(item)
        limits = httpx.Limits(max_connections=self.max_in_flight * len(self.base_urls))
        async with httpx.AsyncClient(timeout=self.timeout_s, limits=limits) as client:
            async def worker(base_url):
                while not queue.empty():
                    i, request = queue.get_nowait()
                    results[i] = await self._complete(client, base_url, request, n)
            workers = [asyncio.create_task(worker(url)) for url in self.base_urls
                       for _ in range(self.max_in_flight)]
            try:
                await asyncio.gather(*workers)
            finally:  # the first failure stops the others (nothing half-done is kept)
                for w in workers:
                    w.cancel()
                await asyncio.gather(*workers, return_exceptions=True)
        return results

    async def _complete(self, client, base_url, request, n) -> list[str]:
        import httpx
        body = {"model": self.model_id, "prompt": request.prompt, "n": n, "temperature": TEMPERATURE,
                "top_p": TOP_P, "max_tokens": MAX_NEW_TOKENS, "stop": ["\n"], "seed": request.seed % SEED_RANGE}
        for attempt in range(self.retries + 1):
            try:
                reply = await client.post(f"{base_url}/completions", json=body)
                if reply.status_code == 429 or reply.status_code >= 500:
                    problem = f"HTTP {reply.status_code}: {reply.text[:200]}"
                elif reply.status_code >= 400:
                    raise ServerError(f"openai engine: {base_url} refused the request for caption "
                                      f"{request.key!r}: HTTP {reply.status_code}: {reply.text[:300]}")
                else:
                    data = reply.json()
                    self.tokens_generated += data.get("usage", {}).get("completion_tokens", 0)
                    choices = sorted(data["choices"], key=lambda c: c["index"])
                    return [first_line(c["text"]) for c in choices]
            except httpx.TransportError as e:
                problem = f"{type(e).__name__}: {e}"
            if attempt < self.retries:  # exponential backoff with jitter
                await asyncio.sleep(self.backoff_s * 2**attempt * (1 + random.random()))
        raise ServerError(f"openai engine: server {base_url} failed {self.retries + 1} times for caption "
                          f"{request.key!r} ({problem}); the run stopped, finished shards are kept: "
                          "re-run the same command to resume")
