"""``distil serve FOLDER``: an OpenAI-compatible server for a local Hugging Face model, on 127.0.0.1.

It makes every example and test of the API-teacher path run offline, and it returns what
distillation needs and some servers leave out: ``n`` choices, ``seed``, and per-token
``logprobs`` / ``top_logprobs`` (which ``transformers serve`` ignores).

Endpoints: ``GET /health``, ``GET /v1/models`` (the model's entry carries a ``distil`` object
with the teacher and tokenizer fingerprints, so a client can tell which weights answered),
``POST /v1/completions`` and ``POST /v1/chat/completions`` (the tokenizer's chat template).
Request fields: ``max_tokens`` (or ``max_completion_tokens``), ``temperature`` (0 = greedy),
``top_p``, ``n``, ``seed``, ``stop``, ``logprobs`` (completions: an int k; chat: a bool with
``top_logprobs`` k), ``return_tokens_as_token_ids`` (as in vLLM: tokens are written
``token_id:N``, which makes them exact). Answers carry ``usage``. Errors are OpenAI-shaped
(``{"error": {"message", "type", "code"}}``): 400 for a bad request, 401 for a wrong key, 404 for
an unknown model.

Decoding, for a causal LM: the ``n`` choices of a request run as one batch with the KV cache.
Logits of padded vocabulary rows (ids the tokenizer does not have) are cut off before anything
is sampled or reported. Reported log-probs are ``log_softmax`` of the raw logits (temperature 1,
before top-p), i.e. the teacher's distribution; the sampled token is drawn from
``softmax(logits / temperature)`` restricted to the top-p nucleus, by a generator seeded from
``(seed, choice index)``, so equal requests give equal answers. The EOS token ends a choice: it is
not part of the text but is counted in ``usage`` and, when log-probs are asked for, has its own
entry (the teacher's distribution at the end, which token-level KD needs for the EOS target).

A folder with a sequence-classification head (``*ForSequenceClassification``) is served as a
labeller: the text of the prompt (or of the last user message) is classified, the answer is the
label name, and log-probs are over the label set. Requests run one at a time (a lock around the
model), and a request whose client has gone (timed out) by the time its turn comes is dropped
instead of computed; the server is for teachers on one machine, not for production traffic.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import json
import logging
import os
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from distil.errors import DistilError

logger = logging.getLogger(__name__)

HOST = "127.0.0.1"
MAX_TOP_LOGPROBS = 20


class ApiError(Exception):
    """An error answer: HTTP status, OpenAI error type and code."""

    def __init__(self, status: int, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


class _Request(BaseModel):
    """Fields shared by both endpoints; unknown fields are ignored, as OpenAI servers do."""

    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    n: int = Field(default=1, ge=1, le=128)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    return_tokens_as_token_ids: bool = False


class CompletionRequest(_Request):
    """``POST /v1/completions``."""

    prompt: str | list[str]
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)


class Message(BaseModel):
    """One chat message (text content only)."""

    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(_Request):
    """``POST /v1/chat/completions``."""

    messages: list[Message] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)


@dataclass(frozen=True)
class Decoding:
    """What a request asks of the decoder."""

    n: int
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stop: tuple[str, ...]
    top_logprobs: int | None  # None: no log-probs
    token_ids: bool  # write tokens as token_id:N


@dataclass(frozen=True)
class Generated:
    """One choice: its text, the tokens behind it (EOS included) and their log-prob entries."""

    text: str
    finish_reason: str
    token_ids: tuple[int, ...]
    entries: tuple[tuple[int, float, tuple[tuple[int, float], ...]], ...]  # (id, lp, top-k)


def choice_seed(seed: int, index: int) -> int:
    """The sampler seed of choice ``index`` of a request with ``seed``."""
    raw = hashlib.sha256(f"{seed}:{index}".encode()).digest()
    return int.from_bytes(raw[:8], "little") & ((1 << 63) - 1)


def _sample(
    logits: torch.Tensor, temperature: float, top_p: float, generators: list[torch.Generator]
) -> torch.Tensor:
    """One token per row from ``softmax(logits / T)`` within the top-p nucleus.

    Args:
        logits: ``[n, V]`` float32.

    Returns:
        ``[n]`` int64 token ids.
    """
    probs = torch.softmax(logits / temperature, dim=-1)  # [n, V]
    probs, order = probs.sort(dim=-1, descending=True)  # [n, V] each
    probs = probs * ((probs.cumsum(-1) - probs) < top_p)  # the top-1 always stays
    cdf = probs.double().cumsum(-1)  # [n, V]
    u = torch.stack([torch.rand((), generator=g, dtype=torch.float64) for g in generators])  # [n]
    pick = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1)).clamp_max(cdf.shape[-1] - 1)
    return order.gather(-1, pick).squeeze(-1)  # [n]


class CausalLMBackend:
    """A causal LM folder served for completions and chat.

    Args:
        folder: ``save_pretrained`` folder with tokenizer files.
        dtype: Parameter dtype (None: the checkpoint's).
        trust_remote_code: Run model code shipped in the folder.
    """

    kind = "causal_lm"

    def __init__(
        self, folder: Path, *, dtype: torch.dtype | None = None, trust_remote_code: bool = False
    ) -> None:
        from distil.cache.manifest import teacher_fingerprint
        from distil.models.lm import load_causal_lm, model_context_length
        from distil.models.vocab import (
            load_tokenizer_folder,
            tokenizer_fingerprint,
            tokenizer_vocab_size,
        )

        self.tokenizer = load_tokenizer_folder(folder, trust_remote_code=trust_remote_code)
        self.model = load_causal_lm(folder, trust_remote_code=trust_remote_code, dtype=dtype)
        self.model.eval().requires_grad_(False)
        # transformers 5.x names the KV cache argument `cache`; 4.x `past_key_values`
        forward = inspect.signature(self.model.forward).parameters
        self.cache_arg = "cache" if "cache" in forward else "past_key_values"
        self.vocab = tokenizer_vocab_size(self.tokenizer)
        self.context = model_context_length(self.model)
        found = getattr(self.model.generation_config, "eos_token_id", None)
        eos = {self.tokenizer.eos_token_id, *(found if isinstance(found, list) else [found])}
        self.eos_ids = frozenset(int(i) for i in eos if i is not None)
        if not self.eos_ids:
            raise DistilError(f"{folder}: neither the tokenizer nor the model config has an EOS")
        self.info = {
            "kind": self.kind,
            "teacher_fingerprint": teacher_fingerprint(self.model),
            "tokenizer_fingerprint": tokenizer_fingerprint(self.tokenizer),
            "vocab_size": self.vocab,
            "context": self.context,
            "dtype": str(self.model.dtype).removeprefix("torch."),
        }

    def prompt_ids(self, prompt: str) -> list[int]:
        """A completion prompt's ids (with the tokenizer's special tokens, as ``lm_kd`` reads it)."""
        return list(self.tokenizer(prompt, add_special_tokens=True)["input_ids"])

    def chat_ids(self, messages: Sequence[Message]) -> list[int]:
        """The chat template's rendering of ``messages`` plus the generation prompt, as ids."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise ApiError(400, "this model's tokenizer has no chat template; use /v1/completions")
        text = self.tokenizer.apply_chat_template(
            [m.model_dump() for m in messages], tokenize=False, add_generation_prompt=True
        )
        return list(self.tokenizer(str(text), add_special_tokens=False)["input_ids"])

    def token_text(self, token_id: int, as_ids: bool) -> str:
        """How a token is written in log-prob entries."""
        return f"token_id:{token_id}" if as_ids else str(self.tokenizer.decode([token_id]))

    @torch.no_grad()
    def generate(self, prompt_ids: list[int], d: Decoding) -> list[Generated]:
        """``d.n`` choices continuing ``prompt_ids`` (see the module docstring for the rules)."""
        if not prompt_ids:
            raise ApiError(400, "the prompt is empty")
        if len(prompt_ids) + d.max_tokens > self.context:
            raise ApiError(
                400,
                f"This model's maximum context length is {self.context} tokens; the prompt has "
                f"{len(prompt_ids)} and max_tokens is {d.max_tokens}",
                code="context_length_exceeded",
            )
        n = d.n
        generators: list[torch.Generator] = []
        if d.temperature > 0:
            base = d.seed if d.seed is not None else int.from_bytes(os.urandom(4), "little")
            generators = [torch.Generator().manual_seed(choice_seed(base, j)) for j in range(n)]
        input_ids = torch.tensor([prompt_ids] * n, dtype=torch.long)  # [n, P]: no padding needed
        out = self.model(input_ids=input_ids, use_cache=True)
        past = _kv_cache(out)
        logits = out.logits[:, -1, : self.vocab].float()  # [n, V]: padded rows cut off
        tokens: list[list[int]] = [[] for _ in range(n)]
        entries: list[list[tuple[int, float, tuple[tuple[int, float], ...]]]] = [
            [] for _ in range(n)
        ]
        finish: list[str | None] = [None] * n
        texts = [""] * n
        for _ in range(d.max_tokens):
            log_probs = torch.log_softmax(logits, dim=-1)  # [n, V]: the teacher's distribution
            if d.temperature == 0:
                chosen = logits.argmax(dim=-1)  # [n]
            else:
                chosen = _sample(logits, d.temperature, d.top_p, generators)  # [n]
            top = None
            if d.top_logprobs is not None:
                k = max(1, d.top_logprobs)
                top = log_probs.topk(k, dim=-1)  # values, indices: [n, k] each
            for r in range(n):
                if finish[r] is not None:
                    continue
                t = int(chosen[r])
                tokens[r].append(t)
                if top is not None:
                    alternatives = tuple(
                        (int(i), float(v))
                        for i, v in zip(
                            top.indices[r].tolist(), top.values[r].tolist(), strict=True
                        )
                    )[: d.top_logprobs]
                    entries[r].append((t, float(log_probs[r, t]), alternatives))
                if t in self.eos_ids:
                    finish[r] = "stop"
                    continue
                texts[r] = str(self.tokenizer.decode(tokens[r], skip_special_tokens=True))
                cut = _stop_position(texts[r], d.stop)
                if cut is not None:
                    texts[r], finish[r] = texts[r][:cut], "stop"
                    tokens[r].pop()  # the token that completed the stop string is not returned
                    if top is not None:
                        entries[r].pop()
            if all(f is not None for f in finish):
                break
            out = self.model(
                input_ids=chosen.unsqueeze(-1), use_cache=True, **{self.cache_arg: past}
            )
            past = _kv_cache(out)
            logits = out.logits[:, -1, : self.vocab].float()  # [n, V]
        return [
            Generated(texts[r], finish[r] or "length", tuple(tokens[r]), tuple(entries[r]))
            for r in range(n)
        ]


def _kv_cache(out: Any) -> Any:
    """The KV cache of a forward output (``cache`` in transformers 5.x, else ``past_key_values``)."""
    cache = out.get("cache")  # not .get(..., default): the 4.x attribute warns in 5.x
    return cache if cache is not None else out.past_key_values


def _stop_position(text: str, stops: Sequence[str]) -> int | None:
    found = [text.find(s) for s in stops if s and s in text]
    return min(found) if found else None


class ClassifierBackend:
    """A sequence-classification folder served as a labeller (the answer is the label name)."""

    kind = "classifier"

    def __init__(self, folder: Path, *, max_length: int = 256) -> None:
        import transformers

        from distil.cache.manifest import teacher_fingerprint
        from distil.models.vocab import load_tokenizer_folder, tokenizer_fingerprint

        self.tokenizer = load_tokenizer_folder(folder)
        self.model = transformers.AutoModelForSequenceClassification.from_pretrained(
            str(folder), local_files_only=True
        )
        self.model.eval().requires_grad_(False)
        config = self.model.config
        self.labels = [str(config.id2label[i]) for i in range(int(config.num_labels))]
        self.max_length = max_length
        self.info = {
            "kind": self.kind,
            "teacher_fingerprint": teacher_fingerprint(self.model),
            "tokenizer_fingerprint": tokenizer_fingerprint(self.tokenizer),
            "labels": self.labels,
        }

    @torch.no_grad()
    def classify(self, text: str, d: Decoding) -> tuple[list[Generated], int]:
        """``d.n`` labels for ``text`` and the number of input tokens."""
        enc = self.tokenizer(text, truncation=True, max_length=self.max_length, return_tensors="pt")
        log_probs = torch.log_softmax(self.model(**enc).logits.float()[0], dim=-1)  # [C]
        choices = []
        for j in range(d.n):
            if d.temperature == 0:
                label = int(log_probs.argmax())
            else:
                base = d.seed if d.seed is not None else int.from_bytes(os.urandom(4), "little")
                g = torch.Generator().manual_seed(choice_seed(base, j))
                probs = torch.softmax(log_probs / d.temperature, dim=-1)
                label = int(torch.multinomial(probs, 1, generator=g))
            entries: tuple[tuple[int, float, tuple[tuple[int, float], ...]], ...] = ()
            if d.top_logprobs is not None:
                k = min(max(1, d.top_logprobs), len(self.labels))
                top = log_probs.topk(k)
                entries = (
                    (
                        label,
                        float(log_probs[label]),
                        tuple(zip(top.indices.tolist(), top.values.tolist(), strict=True)),
                    ),
                )
            choices.append(Generated(self.labels[label], "stop", (label,), entries))
        return choices, int(enc["input_ids"].shape[1])


Backend = CausalLMBackend | ClassifierBackend


def load_backend(folder: str | Path, *, dtype: torch.dtype | None = None) -> Backend:
    """The backend for a model folder: a causal LM or a sequence classifier.

    Raises:
        DistilError: If the folder has no config.json or an architecture of another kind.
    """
    path = Path(folder)
    config = path / "config.json"
    if not config.is_file():
        raise DistilError(f"{path} has no config.json: give a Hugging Face model folder")
    architectures = json.loads(config.read_text()).get("architectures") or []
    if any(a.endswith("ForSequenceClassification") for a in architectures):
        return ClassifierBackend(path)
    if architectures and not any(a.endswith("ForCausalLM") for a in architectures):
        raise DistilError(
            f"{path} holds a {architectures[0]}; `distil serve` serves causal LMs (*ForCausalLM) "
            "and sequence classifiers (*ForSequenceClassification)"
        )
    return CausalLMBackend(path, dtype=dtype)


def _logprobs_json(
    backend: Backend, g: Generated, d: Decoding, chat: bool
) -> dict[str, Any] | None:
    if d.top_logprobs is None:
        return None

    def text(token_id: int) -> str:
        if isinstance(backend, ClassifierBackend):
            return backend.labels[token_id]
        return backend.token_text(token_id, d.token_ids)

    if chat:
        return {
            "content": [
                {
                    "token": text(t),
                    "logprob": lp,
                    "bytes": list(text(t).encode("utf-8")),
                    "top_logprobs": [
                        {"token": text(i), "logprob": v, "bytes": list(text(i).encode("utf-8"))}
                        for i, v in top
                    ],
                }
                for t, lp, top in g.entries
            ]
        }
    offsets, at = [], 0
    for t, _, _ in g.entries:
        offsets.append(at)
        at += (
            len(text(t))
            if isinstance(backend, ClassifierBackend)
            else len(backend.token_text(t, False))
        )
    return {
        "tokens": [text(t) for t, _, _ in g.entries],
        "token_logprobs": [lp for _, lp, _ in g.entries],
        "top_logprobs": [{text(i): v for i, v in top} for _, _, top in g.entries],
        "text_offset": offsets,
    }


def build_app(
    backend: Backend,
    *,
    model_name: str,
    api_key: str | None = None,
    usage_log: Path | None = None,
) -> FastAPI:
    """The FastAPI application serving ``backend`` as ``model_name``.

    Args:
        backend: The loaded model.
        model_name: The name clients must send as ``model``.
        api_key: When set, every ``/v1`` request must carry ``Authorization: Bearer <key>``.
        usage_log: Append one JSON line per answer (id, usage, the client's ``Idempotency-Key``),
            so the client's ledger can be audited against the server's own counts.
    """
    app = FastAPI(title=f"distil serve: {model_name}")
    lock = asyncio.Lock()
    created = int(time.time())

    def error(status: int, message: str, code: str | None = None) -> JSONResponse:
        kind = {401: "authentication_error", 404: "invalid_request_error"}.get(
            status, "invalid_request_error" if status < 500 else "server_error"
        )
        body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
        return JSONResponse(body, status_code=status)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error(exc.status, exc.message, exc.code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or "body"
        return error(400, f"{where}: {first.get('msg', 'invalid request')}", "invalid_request")

    def authorize(request: Request) -> None:
        # a check per endpoint, not an HTTP middleware: Starlette's middleware wraps the ASGI
        # receive channel and hides client disconnects from the handler
        if api_key is not None and request.headers.get("authorization") != f"Bearer {api_key}":
            raise ApiError(401, "Incorrect API key provided", code="invalid_api_key")

    def check(body: _Request, chat: bool) -> Decoding:
        if body.model != model_name:
            raise ApiError(
                404,
                f"The model `{body.model}` does not exist (this server has `{model_name}`)",
                code="model_not_found",
            )
        if body.stream:
            raise ApiError(400, "stream=true is not supported by distil serve", code="unsupported")
        stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        if chat:
            assert isinstance(body, ChatRequest)
            top = (body.top_logprobs or 0) if body.logprobs else None
        else:
            assert isinstance(body, CompletionRequest)
            top = body.logprobs
        return Decoding(
            n=body.n,
            max_tokens=body.max_completion_tokens or body.max_tokens or 16,
            temperature=body.temperature,
            top_p=body.top_p,
            seed=body.seed,
            stop=stop,
            top_logprobs=top,
            token_ids=body.return_tokens_as_token_ids,
        )

    def account(
        rid: str, prompt_tokens: int, completion_tokens: int, request: Request
    ) -> dict[str, int]:
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }
        if usage_log is not None:
            line = {
                "id": rid,
                "time": time.time(),
                "idempotency_key": request.headers.get("idempotency-key"),
                **usage,
            }
            with open(usage_log, "a", encoding="utf-8") as f:
                f.write(json.dumps(line) + "\n")
        return usage

    async def run(
        prompt: str | list[Message], d: Decoding, request: Request
    ) -> tuple[list[Generated], int]:
        def work() -> tuple[list[Generated], int]:
            if isinstance(backend, ClassifierBackend):
                text = prompt if isinstance(prompt, str) else _last_user(prompt)
                return backend.classify(text, d)
            ids = (
                backend.prompt_ids(prompt) if isinstance(prompt, str) else backend.chat_ids(prompt)
            )
            return backend.generate(ids, d), len(ids)

        async with lock:  # one generation at a time: the model is not shared between threads
            if await request.is_disconnected():
                # the client gave up (timed out) while this waited for the model: generating now
                # would only delay every request queued behind it (a retry storm feeds on this)
                raise ApiError(499, "the client closed the request before it was served")
            return await asyncio.to_thread(work)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        authorize(request)
        entry = {
            "id": model_name,
            "object": "model",
            "created": created,
            "owned_by": "distil",
            "distil": backend.info,
        }
        return {"object": "list", "data": [entry]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> dict[str, Any]:
        authorize(request)
        d = check(body, chat=False)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        choices, prompt_tokens, completion_tokens = [], 0, 0
        for p_index, prompt in enumerate(prompts):
            generated, used = await run(prompt, d, request)
            prompt_tokens += used
            for j, g in enumerate(generated):
                completion_tokens += len(g.token_ids)
                choices.append(
                    {
                        "index": p_index * d.n + j,
                        "text": g.text,
                        "logprobs": _logprobs_json(backend, g, d, chat=False),
                        "finish_reason": g.finish_reason,
                    }
                )
        rid = f"cmpl-{uuid.uuid4().hex}"
        return {
            "id": rid,
            "object": "text_completion",
            "created": int(time.time()),
            "model": model_name,
            "choices": choices,
            "usage": account(rid, prompt_tokens, completion_tokens, request),
        }

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request) -> dict[str, Any]:
        authorize(request)
        d = check(body, chat=True)
        generated, prompt_tokens = await run(list(body.messages), d, request)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        choices = [
            {
                "index": j,
                "message": {"role": "assistant", "content": g.text},
                "logprobs": _logprobs_json(backend, g, d, chat=True),
                "finish_reason": g.finish_reason,
            }
            for j, g in enumerate(generated)
        ]
        completion_tokens = sum(len(g.token_ids) for g in generated)
        return {
            "id": rid,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model_name,
            "choices": choices,
            "usage": account(rid, prompt_tokens, completion_tokens, request),
        }

    return app


def _last_user(messages: Sequence[Message]) -> str:
    for m in reversed(messages):
        if m.role == "user":
            return m.content
    raise ApiError(400, "a classifier needs a user message holding the text to label")


def serve(
    folder: str | Path,
    *,
    port: int,
    model_name: str | None = None,
    api_key_env: str | None = None,
    usage_log: Path | None = None,
    threads: int | None = None,
    dtype: torch.dtype | None = None,
) -> None:
    """Load ``folder`` and serve it on ``127.0.0.1:port`` until interrupted.

    Raises:
        DistilError: On a bad folder, or an ``api_key_env`` that is not set.
    """
    import uvicorn

    if threads is not None:
        torch.set_num_threads(threads)
    api_key = None
    if api_key_env is not None:
        api_key = os.environ.get(api_key_env)
        if not api_key:
            raise DistilError(f"--api-key-env names {api_key_env}, which is not set")
    backend = load_backend(folder, dtype=dtype)
    name = model_name or Path(folder).resolve().name
    app = build_app(backend, model_name=name, api_key=api_key, usage_log=usage_log)
    logger.warning(
        "serving %s (%s) as %r on http://%s:%d/v1", folder, backend.kind, name, HOST, port
    )
    uvicorn.run(app, host=HOST, port=port, log_level="warning", access_log=False)
