"""Request and response bodies of the HTTP server (pydantic): they validate each request on its own and
give the OpenAPI document. Types are strict (a budget given as the string "1e-4" or as `true` is
rejected, not converted) and text must be valid Unicode (a lone surrogate is rejected before it reaches
the tokenizer)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from .router import SERVING_MODES


def _unicode(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("is not valid Unicode text (it holds a lone surrogate)") from None
    return text


Text = Annotated[str, AfterValidator(_unicode)]
Mode = Literal[SERVING_MODES]  # type: ignore[valid-type]
BUDGET = "USD per query, inside the checkpoint's calibrated range (GET /health); default: the server's."


class Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class Observation(Strict):
    """What a query has seen from one model."""

    model: str = Field(description="a model of the checkpoint")
    answer: Text | None = None
    confidence: float | None = Field(None, description="log-probability of the answer (<= 0; above counts as 0)")
    tokens_out: float | None = Field(None, ge=0)
    cost: float | None = Field(None, ge=0, description="USD actually spent on this call")


class RouteBatchRequest(Strict):
    """A batch of in-flight queries and what each has seen so far."""

    queries: list[Text]
    observed: list[list[Observation]] | None = Field(None, description="one list per query; default: nothing seen")
    budget: float | None = Field(None, description=BUDGET)
    mode: Mode | None = None
    sources: list[Text] | None = Field(None, description="the task tag of each query, as in the training table")


class DecisionBody(BaseModel):
    next_model: str | None = Field(description="the model to call next; null: stop")
    answer_model: str | None = Field(description="when stopping: the model whose answer to return")
    step: int
    quality: dict[str, float]
    cost: dict[str, float]
    plan: list[str]


class RouteBatchResponse(BaseModel):
    decisions: list[DecisionBody]


class TextPart(Strict):
    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    """An OpenAI chat message; text content only. Other fields (name, tool_call_id, ...) are passed on."""

    model_config = ConfigDict(strict=True, extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "\n".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(BaseModel):
    """An OpenAI chat completion request, plus the router's fields (through `extra_body` in the openai
    client). Other OpenAI fields are accepted and ignored."""

    model_config = ConfigDict(strict=True, extra="allow")
    model: str = Field(description="the router's id (GET /v1/models) to route, or one model of the pool to call it")
    messages: list[ChatMessage] = Field(min_length=1)
    budget: float | None = Field(None, description=BUDGET + " Also the X-Router-Budget header.")
    mode: Mode | None = Field(None, description="Default: the server's. Also the X-Router-Mode header.")
    source: Text | None = Field(None, description="task tag as in the training table. Also X-Router-Source.")
    stream: bool = Field(False, description="the final answer comes as one chunk")
    stream_options: dict[str, Any] | None = None
    n: int | None = Field(None, ge=1, le=1, description="only 1")
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    stop: Text | list[Text] | None = None
    seed: int | None = None

    def backend_params(self) -> dict:
        """The sampling parameters passed on to every backend call."""
        params = {"max_tokens": self.max_tokens or self.max_completion_tokens, "temperature": self.temperature,
                  "top_p": self.top_p, "stop": self.stop, "seed": self.seed}
        return {key: value for key, value in params.items() if value is not None}
