"""Config sections of the jobs that talk to an OpenAI-compatible endpoint.

``distil generate`` in endpoint mode (:class:`EndpointGenerateConfig`) and ``distil relabel``
(:class:`distil.remote.relabel.RelabelConfig`) share these: where the teacher is
(:class:`EndpointSection`), how hard to push it (:class:`LimitsSection`), what to do on errors
(:class:`RetrySection`) and what it may cost (:class:`BudgetSection`). The API key is never a
config value: ``endpoint.api_key_env`` names the environment variable that holds it, so a
resolved config, a manifest or a log can be shared without leaking it.
"""

from __future__ import annotations

import re
from enum import Enum
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from distil.config.base import StrictModel
from distil.data.prompts import PromptsSection
from distil.verify import VerifySection

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class Api(str, Enum):
    """Which OpenAI endpoint a job calls."""

    CHAT = "chat"  # /v1/chat/completions: messages, rendered by the server's chat template
    COMPLETIONS = "completions"  # /v1/completions: the raw prompt text


class SampleRequests(str, Enum):
    """How ``num_return_sequences`` samples of one prompt are requested."""

    N = "n"  # one request with n=k (the prompt is paid once); per-sample requests if ignored
    REQUESTS = "requests"  # k requests with n=1, each with its own seed


class EndpointSection(StrictModel):
    """An OpenAI-compatible server and the model to ask."""

    base_url: str = Field(description="e.g. http://127.0.0.1:8765/v1 (`distil serve` prints it)")
    model: str = Field(description="model name as the server knows it (GET /v1/models)")
    api: Api = Api.CHAT
    api_key_env: str | None = Field(
        default=None,
        description="NAME of the environment variable holding the API key (never the key); "
        "null for a local server without keys",
    )
    extra_body: dict[str, Any] = Field(
        default_factory=dict,
        description="extra request fields sent verbatim, e.g. {return_tokens_as_token_ids: true} "
        "for vLLM and `distil serve`; part of each request's idempotency key",
    )
    headers: dict[str, str] = Field(
        default_factory=dict, description="extra HTTP headers (not part of the key)"
    )

    @field_validator("base_url")
    @classmethod
    def _http(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {v!r}")
        return v.rstrip("/")

    @field_validator("api_key_env")
    @classmethod
    def _a_name_not_a_key(cls, v: str | None) -> str | None:
        if v is not None and not _ENV_NAME.match(v):
            raise ValueError(
                "api_key_env takes the NAME of an environment variable (e.g. OPENAI_API_KEY), not "
                "the key itself: export the key in that variable and put its name here"
            )
        return v

    @field_validator("headers")
    @classmethod
    def _no_auth_header(cls, v: dict[str, str]) -> dict[str, str]:
        if any(k.lower() in ("authorization", "api-key", "x-api-key") for k in v):
            raise ValueError(
                "keys do not go in endpoint.headers (they would be written to the run's config); "
                "set endpoint.api_key_env to the name of an environment variable instead"
            )
        return v


class LimitsSection(StrictModel):
    """Concurrency, rate limits and timeouts of the client."""

    concurrency: int = Field(default=4, ge=1, le=512, description="requests in flight at most")
    requests_per_minute: float | None = Field(default=None, gt=0, description="null: no limit")
    tokens_per_minute: float | None = Field(
        default=None, gt=0, description="prompt + completion tokens (estimated, then settled)"
    )
    timeout_s: float = Field(default=120.0, gt=0, description="per attempt, whole request")
    connect_timeout_s: float = Field(default=10.0, gt=0)


class RetrySection(StrictModel):
    """Retries of transient failures (timeouts, 408/409/429/5xx, resets, malformed bodies)."""

    max_attempts: int = Field(default=8, ge=1, description="attempts per request, first included")
    backoff_initial_s: float = Field(default=0.5, gt=0)
    backoff_max_s: float = Field(default=30.0, gt=0)
    rate_limit_cooldown_s: float = Field(
        default=10.0, gt=0, description="shared pause after a 429 without a Retry-After header"
    )
    seed: int = Field(default=0, description="seeds the back-off jitter")

    @model_validator(mode="after")
    def _ordered(self) -> RetrySection:
        if self.backoff_max_s < self.backoff_initial_s:
            raise ValueError("retry.backoff_max_s must be at least retry.backoff_initial_s")
        return self


class Price(StrictModel):
    """Price of a model's tokens, per million."""

    prompt_per_million: float = Field(default=0.0, ge=0)
    completion_per_million: float = Field(default=0.0, ge=0)


class BudgetSection(StrictModel):
    """The price table and the limits that stop a job (cumulative over resumed runs)."""

    prices: dict[str, Price] = Field(
        default_factory=dict, description="by model name: {prompt_per_million, ...}"
    )
    currency: str = "USD"
    max_cost: float | None = Field(default=None, gt=0, description="stop before passing this")
    max_tokens: int | None = Field(default=None, gt=0, description="prompt + completion tokens")


class EndpointGeneration(StrictModel):
    """What each request asks for."""

    max_new_tokens: int = Field(default=64, ge=1)
    sampling_temperature: float = Field(default=0.0, ge=0, description="0 = greedy")
    top_p: float = Field(default=1.0, gt=0, le=1)
    num_return_sequences: int = Field(default=1, ge=1, description="samples per prompt")
    samples_via: SampleRequests = SampleRequests.N
    seed: int | None = Field(
        default=0, description="with the request's content and sample index, seeds each request"
    )
    stop: list[str] = Field(default_factory=list, description="stop strings")
    top_logprobs: int = Field(
        default=0,
        ge=0,
        le=20,
        description="> 0: ask for the top-k log-probs of every generated token (token-level KD "
        "via `distil cache from-api`); 0: text only (sequence-level KD)",
    )

    @model_validator(mode="after")
    def _sampling_only(self) -> EndpointGeneration:
        if self.sampling_temperature == 0 and (self.top_p < 1 or self.num_return_sequences > 1):
            raise ValueError(
                "greedy decoding (sampling_temperature=0) ignores top_p and repeats one completion: "
                "set sampling_temperature > 0, or top_p=1 and num_return_sequences=1"
            )
        return self


class PromptVariant(StrictModel):
    """One way of asking (PromptMix-style augmentation asks each prompt several ways)."""

    name: str = "default"
    system_prompt: str | None = None
    template: str = Field(default="{prompt}", description="`{prompt}` is replaced by the prompt")

    @field_validator("template")
    @classmethod
    def _has_slot(cls, v: str) -> str:
        if "{prompt}" not in v:
            raise ValueError("a template must contain {prompt}")
        return v


class EndpointGenerateConfig(StrictModel):
    """A ``distil generate`` config whose teacher is an endpoint (``teacher: {base_url, model}``)."""

    command: Literal["generate"] = "generate"
    teacher: EndpointSection
    tokenizer: str | None = Field(
        default=None, description="tokenizer folder: cuts prompts.source.builtin windows"
    )
    prompts: PromptsSection = PromptsSection(limit=256)
    variants: list[PromptVariant] = Field(default_factory=lambda: [PromptVariant()])
    generation: EndpointGeneration = EndpointGeneration()
    limits: LimitsSection = LimitsSection()
    retry: RetrySection = RetrySection()
    budget: BudgetSection = BudgetSection()
    verify: VerifySection | None = None
    shard_size: int = Field(default=256, ge=1, description="records per output shard")
    output: str = "runs/generated-api"

    @model_validator(mode="after")
    def _consistent(self) -> EndpointGenerateConfig:
        names = [v.name for v in self.variants]
        if not names:
            raise ValueError("variants: give at least one (the default is [{name: default}])")
        if len(set(names)) != len(names):
            raise ValueError(f"variants: names must be unique, got {names}")
        if self.teacher.api is Api.COMPLETIONS and any(v.system_prompt for v in self.variants):
            raise ValueError(
                "variants[].system_prompt needs teacher.api=chat (completions have no system "
                "role); put the instruction into the template instead"
            )
        if self.prompts.builtin is not None and self.tokenizer is None:
            raise ValueError(
                "prompts.source.builtin cuts windows of prompts.prompt_tokens tokens: set tokenizer "
                "to the teacher's tokenizer folder, or give a JSONL file: prompts.source={train: [F]}"
            )
        check_budget(self.budget, self.teacher.model)
        return self


def check_budget(budget: BudgetSection, model: str) -> None:
    """A cost limit needs the model's price (else the spend is unknown).

    Raises:
        ValueError: If ``budget.max_cost`` is set and ``budget.prices`` lacks ``model``.
    """
    if budget.max_cost is not None and model not in budget.prices:
        known = sorted(budget.prices) or "none"
        raise ValueError(
            f"budget.max_cost needs the price of {model!r} in budget.prices (priced: {known}), "
            f"e.g. budget.prices={{{model}: {{prompt_per_million: 0.5, completion_per_million: 1.5}}}}"
        )


def generate_config_model(data: dict[str, Any]) -> type[StrictModel]:
    """The ``distil generate`` config model for a YAML mapping: the endpoint mode's when
    ``teacher`` names a server (``{base_url, model: NAME, ...}``), the local one's otherwise
    (``teacher: {model: {hf: FOLDER}}``)."""
    teacher = data.get("teacher")
    if isinstance(teacher, dict) and "base_url" in teacher:
        return EndpointGenerateConfig
    from distil.generation import GenerateConfig

    return GenerateConfig
