"""From prompts to requests: templates and system prompts, idempotency keys, exact-duplicate merging.

Each (prompt, variant) becomes one request group: the request body without the seed, sent for
``num_return_sequences`` samples. Each sample has an **idempotency key**, a sha256 over the
model, the API, the exact input (the messages, or the completion prompt), every request
parameter that can change the answer (max tokens, temperature, top-p, stop strings, log-probs,
extra body fields), the seed and the sample index. A record is found again by its key, so:

- a rerun with the same config finds every key and sends nothing;
- a changed parameter (say ``max_new_tokens``) changes the keys of the requests it affects
  (here: all), while a changed template changes only its variant's keys, and a prompt added to
  the file adds only its own;
- prompts that render to the same input are the same request: it is sent once, and the later
  prompt ids are recorded as duplicates of the first.

The prompt id is not in the key (ids name prompts; the content decides the answer).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from distil.data.prompts import Prompt
from distil.remote.config import Api, EndpointGeneration, EndpointSection, PromptVariant
from distil.remote.records import canonical_json


@dataclass(frozen=True)
class RequestGroup:
    """One prompt asked one way.

    Attributes:
        group: sha256 of the request body without seed and sample index.
        prompt: The (first) prompt with this content.
        variant: The variant's name.
        text: The prompt after the template (the completion prompt, or the user message).
        messages: The chat messages sent (chat API), else None.
        sample_keys: The idempotency key of each sample, in sample order.
        duplicates: Ids of later prompts with the same content (sent once, under ``prompt``).
    """

    group: str
    prompt: Prompt
    variant: str
    text: str
    messages: tuple[Mapping[str, str], ...] | None
    sample_keys: tuple[str, ...]
    duplicates: tuple[int | str, ...] = ()

    @property
    def api_input(self) -> Any:
        """What goes into the key as the input: the messages or the prompt text."""
        return list(self.messages) if self.messages is not None else self.text

    @property
    def text_bytes(self) -> int:
        """UTF-8 size of everything the prompt holds (for token estimates)."""
        if self.messages is None:
            return len(self.text.encode("utf-8"))
        return sum(len(m["content"].encode("utf-8")) for m in self.messages)


def request_params(endpoint: EndpointSection, generation: EndpointGeneration) -> dict[str, Any]:
    """The request parameters that decide an answer (and so are part of every key)."""
    params: dict[str, Any] = {
        "max_tokens": generation.max_new_tokens,
        "temperature": generation.sampling_temperature,
        "top_p": generation.top_p,
        "stop": list(generation.stop),
        "top_logprobs": generation.top_logprobs,
    }
    if endpoint.extra_body:
        params["extra_body"] = dict(endpoint.extra_body)
    return params


def request_key(
    *,
    model: str,
    api: str,
    api_input: Any,
    params: Mapping[str, Any],
    seed: int | None,
    sample: int,
) -> str:
    """The idempotency key of one sample (hex sha256, shortened to 32 characters)."""
    payload = {
        "model": model,
        "api": api,
        "input": api_input,
        "params": dict(params),
        "seed": seed,
        "sample": sample,
    }
    return hashlib.sha256(canonical_json(payload).encode("utf-8")).hexdigest()[:32]


def sample_seed(seed: int | None, group: str, sample: int) -> int | None:
    """The seed sent for a request starting at ``sample``: a function of the run seed, the request
    content and the sample index (not the prompt id, so duplicates agree)."""
    if seed is None:
        return None
    raw = hashlib.sha256(canonical_json([seed, group, sample]).encode("utf-8")).digest()
    return int.from_bytes(raw[:4], "little") & 0x7FFFFFFF


def render(
    variant: PromptVariant, prompt: str, api: Api
) -> tuple[str, tuple[dict[str, str], ...] | None]:
    """The prompt text after the template and, for chat, the messages."""
    text = variant.template.replace("{prompt}", prompt)  # not str.format: prompts hold braces
    if api is Api.COMPLETIONS:
        return text, None
    system = (
        ({"role": "system", "content": variant.system_prompt},) if variant.system_prompt else ()
    )
    return text, (*system, {"role": "user", "content": text})


def plan_requests(
    prompts: Sequence[Prompt],
    variants: Sequence[PromptVariant],
    endpoint: EndpointSection,
    generation: EndpointGeneration,
) -> list[RequestGroup]:
    """Every request group of a job, in prompt order then variant order, duplicates merged."""
    params = request_params(endpoint, generation)
    api = endpoint.api.value
    first: dict[str, int] = {}
    groups: list[RequestGroup] = []
    dupes: dict[int, list[int | str]] = {}
    for prompt in prompts:
        for variant in variants:
            text, messages = render(variant, prompt.text, endpoint.api)
            api_input: Any = list(messages) if messages is not None else text
            body = {"model": endpoint.model, "api": api, "input": api_input, "params": params}
            group = hashlib.sha256(canonical_json(body).encode("utf-8")).hexdigest()[:32]
            if group in first:
                dupes.setdefault(first[group], []).append(prompt.id)
                continue
            keys = tuple(
                request_key(
                    model=endpoint.model,
                    api=api,
                    api_input=api_input,
                    params=params,
                    seed=generation.seed,
                    sample=j,
                )
                for j in range(generation.num_return_sequences)
            )
            first[group] = len(groups)
            groups.append(RequestGroup(group, prompt, variant.name, text, messages, keys))
    return [
        RequestGroup(
            g.group, g.prompt, g.variant, g.text, g.messages, g.sample_keys, tuple(dupes[i])
        )
        if i in dupes
        else g
        for i, g in enumerate(groups)
    ]
