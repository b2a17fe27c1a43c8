"""The API's request and response bodies, and the checks and error messages of a request."""

from __future__ import annotations

from pydantic import BaseModel, Field, StrictStr
from starlette.exceptions import HTTPException

from ..task import is_blank
from .settings import Settings


class ClassifyRequest(BaseModel):
    messages: list[StrictStr] = Field(
        description="SMS messages to classify (1 to --max-messages, each 1 to --max-chars "
                    "characters, not blank)",
        examples=[["Royal Mail: your parcel is held, pay £1.45 at royalmail-fee.com",
                   "See you at 6 by the station?"]])


class Result(BaseModel):
    label: str = Field(description='"spam" or "ham"', examples=["spam"])
    p_spam: float = Field(description="P(spam) from the model; label is spam when over the "
                                      "threshold", examples=[0.97])


class ClassifyResponse(BaseModel):
    model: str
    threshold: float
    results: list[Result]


class ErrorBody(BaseModel):
    error: str


ERRORS = {code: {"model": ErrorBody, "description": what} for code, what in [
    (400, "malformed JSON, or a Host header that does not name this server"),
    (401, "missing or wrong API key (when one is set)"),
    (403, "a cross-origin request from a site not allowed"),
    (413, "request body too large"), (415, "a body that is not sent as JSON"),
    (422, "invalid request (fields, counts, lengths, tokens)"),
    (503, "model still loading, too much waiting for the model, or stopping")]}


def validation_message(errors) -> tuple[int, str]:
    """FastAPI's validation errors as one line, and 400 for malformed JSON, 422 otherwise."""
    if not errors:
        return 422, "invalid request"
    e = errors[0]
    if e.get("type") == "json_invalid":
        ctx = e.get("ctx") or {}
        return 400, f"malformed JSON: {ctx.get('error', e.get('msg', ''))}".rstrip(": ")
    loc = [str(x) for x in e.get("loc", ()) if x != "body"]
    where = loc[0] if loc else "body"
    for x in loc[1:]:
        where += f"[{x}]" if x.isdigit() else f".{x}"
    msg = e.get("msg", "invalid")
    if e.get("type") == "missing":
        msg = ("expected a JSON object like {\"messages\": [\"...\"]}" if where == "body"
               else "field required")
    if where == "body":  # the body itself is not an object
        msg = "expected a JSON object like {\"messages\": [\"...\"]}"
    if where == "messages" and e.get("type") == "list_type":
        msg = "expected a list of strings"
    return 422, f"{where}: {msg}"


def is_json(content_type: str) -> bool:
    mime = content_type.split(";", 1)[0].strip().lower()
    return mime == "application/json" or (mime.startswith("application/")
                                          and mime.endswith("+json"))


def check_messages(messages: list[str], s: Settings) -> None:
    if not messages:
        raise HTTPException(422, "messages is empty: send at least one message")
    if len(messages) > s.max_messages:
        raise HTTPException(422, f"{len(messages)} messages, more than the limit of "
                                 f"{s.max_messages} per request")
    for i, m in enumerate(messages):
        if is_blank(m):
            raise HTTPException(422, f"messages[{i}] is blank")
        if len(m) > s.max_chars:
            raise HTTPException(422, f"messages[{i}] has {len(m)} characters, more than the "
                                     f"limit of {s.max_chars}")
        try:
            m.encode("utf-8")
        except UnicodeEncodeError:
            raise HTTPException(422, f"messages[{i}] is not valid Unicode text "
                                     "(an unpaired surrogate)")


def check_tokens(costs: list[int], s: Settings) -> None:
    """What the request costs the model: its messages' prompt tokens, within the limit."""
    if sum(costs) > s.max_request_tokens:
        raise HTTPException(422, f"the messages come to {sum(costs)} prompt tokens, more than "
                                 f"the limit of {s.max_request_tokens} per request: send fewer "
                                 "or shorter messages per request")
