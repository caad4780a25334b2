"""The OpenAI request bodies the server accepts (pydantic), and what they turn into."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from .engine import GenerationOutput, SamplingOptions

MAX_PROMPTS_PER_REQUEST = 16
MAX_MESSAGES = 64


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str = Field(..., max_length=4096)
    composition: dict[str, Any] | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=10.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stop: str | list[str] | None = None
    stream: bool = False
    ignore_eos: bool = False
    n: int = Field(1, ge=1, le=1)
    user: str | None = None

    def model_field(self) -> str | dict:
        """What the request runs with: the structured composition when given, else ``model``."""
        return self.composition if self.composition is not None else self.model

    def options(self, default_max: int = 16) -> SamplingOptions:
        stop = self.stop if isinstance(self.stop, list) else ([self.stop] if self.stop else [])
        max_tokens = getattr(self, "max_completion_tokens", None) or self.max_tokens or default_max
        return SamplingOptions(max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p, seed=self.seed,
                               stop=tuple(stop), ignore_eos=self.ignore_eos)


class CompletionBody(_Body):
    prompt: str | list[int] | list[str] = Field(..., min_length=1)

    def prompts(self) -> list[Any]:
        """One entry per choice: a list of strings is several prompts, a list of ints is one."""
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], str):
            return list(self.prompt)
        return [self.prompt]


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str = Field(..., max_length=32)
    content: str


class ChatBody(_Body):
    messages: list[Message] = Field(..., min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(None, ge=1)


def usage(outputs: list[GenerationOutput]) -> dict:
    prompt = sum(len(o.prompt_token_ids) for o in outputs)
    completion = sum(len(o.token_ids) for o in outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


__all__ = ["MAX_MESSAGES", "MAX_PROMPTS_PER_REQUEST", "ChatBody", "CompletionBody", "Message", "usage"]
