"""Tool calling through vLLM's own machinery: its tool parsers, and structured outputs for forced calls.

`tool_choice` "required" or a named function works with any model: as vLLM's server does, the answer is constrained
to JSON of the function's parameters (or the parser's own call syntax, for parsers that bring a structural tag), so
it is always a well-formed call. "auto" lets the model choose, which needs a chat template that shows it the tools
and a tool parser (the provider's `tool_parser`) that finds calls in what it writes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from runtime.errors import InvalidRequestError, RuntimeFailure, client_error

_MAX_TOOLS = 128
ToolChoice = Literal["none", "auto", "required", "named"]


def compose_parser(tokenizer: Any, tool_parser: str | None, model: str, strict_level: str = "parameter") -> type:
    """vLLM's Parser class for this engine: the named tool parser, or one that reads forced calls only.

    `strict_level` is vLLM's `--tool-strict-level` for parsers with a call syntax of their own: "parameter" holds
    every call's arguments to its function's schema, "function" only the call's envelope, "auto" (vLLM's default)
    arguments only for tools marked `strict`.
    """
    from vllm.parser import ParserManager
    from vllm.parser.abstract_parser import DelegatingParser
    from vllm.tool_parsers import ToolParser, ToolParserManager

    if tool_parser is None:
        class ForcedCallsOnly(ToolParser):
            """The generic JSON reading of "required" and named calls, with no model-specific syntax for "auto"."""

        class ForcedCallsParser(DelegatingParser):
            tool_parser_cls = ForcedCallsOnly

        return ForcedCallsParser
    if tool_parser not in ToolParserManager.list_registered():
        known = ", ".join(ToolParserManager.list_registered())
        raise RuntimeFailure(f"unknown tool_parser {tool_parser!r}; vLLM's tool parsers are: {known}")
    try:
        return ParserManager.get_parser(tool_parser_name=tool_parser, enable_auto_tools=True, model_name=model,
                                        tokenizer=tokenizer, tool_strict_level=strict_level)
    except (TypeError, ValueError, ImportError, RuntimeError) as error:
        raise RuntimeFailure(f"tool_parser {tool_parser!r} cannot serve this model: {error}") from error


def template_takes_tools(tokenizer: Any) -> bool:
    """Whether the chat template (the one transformers picks when tools are given) reads the `tools` variable."""
    from vllm.renderers.hf import _cached_resolve_chat_template_kwargs

    try:
        return "tools" in _cached_resolve_chat_template_kwargs(tokenizer.get_chat_template(tools=[]))
    except Exception:  # no template, or one jinja cannot parse: either way it cannot take tools
        return False


@dataclass(frozen=True, slots=True)
class ToolSupport:
    """What one engine can do with tools, settled when it starts."""

    model: str
    tokenizer: Any
    parser_cls: type
    parser_name: str | None
    takes_tools: bool
    model_config: Any = None

    def plan(self, body: dict[str, Any]) -> ToolPlan | None:
        """The tool handling of one chat request, or None when it has no tools."""
        tools = body.get("tools")
        choice = body.get("tool_choice")
        if not tools:
            # "auto" with nothing to call is no tool request (the Responses API takes it so); a forced call is.
            if choice not in (None, "none", "auto"):
                raise InvalidRequestError("'tool_choice' needs 'tools'", "tool_choice")
            return None
        names = _check_tools(tools)
        kind = _choice_kind(choice, names)
        if kind == "none":
            return ToolPlan(self, tools, "none", None, None)
        if kind == "auto":
            self._check_auto()
        from vllm.exceptions import VLLMClientError

        request = _vllm_request(self.model, body)
        try:
            request = self.new_parser(request).adjust_request(request)
            structured = request.extract_structured_outputs()
        except (VLLMClientError, ValueError, TypeError) as error:
            raise client_error(error, "tools") from error
        return ToolPlan(self, tools, kind, request, structured)

    def new_parser(self, request: Any) -> Any:
        return self.parser_cls(self.tokenizer, request.tools, model_config=self.model_config)

    def _check_auto(self) -> None:
        forced = "send tool_choice 'required' or a named function to force a call"
        if self.parser_name is None:
            raise InvalidRequestError(
                f"tool_choice 'auto' needs a tool parser to find the calls model {self.model} writes, and its provider "
                f"sets none (the policy's `tool_parser`); {forced}", "tool_choice", "unsupported_value")
        if not self.takes_tools:
            raise InvalidRequestError(
                f"the chat template of model {self.model} does not take tools, so the model cannot choose one itself "
                f"(tool_choice 'auto'); {forced}, or give the provider a `chat_template` that takes tools",
                "tool_choice", "unsupported_value")


@dataclass(frozen=True, slots=True)
class ToolPlan:
    support: ToolSupport
    tools: list[dict[str, Any]]  # as the chat template takes them
    choice: ToolChoice
    request: Any  # vLLM's ChatCompletionRequest, after its parser adjusted it; None for "none"
    structured: Any  # the StructuredOutputsParams the answer is held to, if any

    def for_choice(self, prompt_ids: list[int]) -> ChoiceTools | None:
        """The tool reading of one choice (parsers keep state, so each choice has its own); None when calls are off."""
        if self.request is None:
            return None
        return ChoiceTools(self, prompt_ids)


class ChoiceTools:
    """Reads the tool calls of one choice, from its whole text or delta by delta."""

    def __init__(self, plan: ToolPlan, prompt_ids: list[int]) -> None:
        self._plan = plan
        self._parser = plan.support.new_parser(plan.request)
        self._parser.set_prompt_token_ids(prompt_ids)
        self._prompt_ids = prompt_ids
        self._single = plan.request.parallel_tool_calls is False
        self.called = False

    def whole(self, text: str, token_ids: list[int]) -> tuple[str | None, list[dict[str, Any]]]:
        """The message content left beside the calls, and the calls as OpenAI's `message.tool_calls`."""
        from vllm.renderers.chat_utils import make_tool_call_id

        try:
            _, content, calls = self._parser.parse(text, self._plan.request,
                                                   enable_auto_tools=self._plan.support.parser_name is not None,
                                                   model_output_token_ids=token_ids)
        except Exception as error:  # a parser that trips over the model's text is a bad answer
            raise _unreadable(error) from error
        calls = (calls or [])[:1] if self._single else calls or []
        self.called = bool(calls)
        out = [{"id": call.id or make_tool_call_id(), "type": "function",
                "function": {"name": call.name, "arguments": call.arguments}} for call in calls]
        return (content or None) if out else (content or ""), out

    def delta(self, text: str, token_ids: list[int], finished: bool) -> dict[str, Any] | None:
        """The chunk delta for this piece of the answer, or None while the parser holds it back."""
        try:
            message = self._parser.parse_delta(text, list(token_ids), self._plan.request, self._prompt_ids,
                                               finished=finished)
        except Exception as error:  # as in whole()
            raise _unreadable(error) from error
        if message is None:
            return None
        delta: dict[str, Any] = {}
        if message.content:
            delta["content"] = message.content
        calls = [call for call in map(_call_delta, message.tool_calls or [])
                 if call is not None and not (self._single and call["index"] > 0)]
        if calls:
            delta["tool_calls"] = calls
            self.called = True
        return delta or None

    def finish_reason(self, reason: str | None) -> str | None:
        # OpenAI's: "tool_calls" when the model called tools of its own accord or because it had to; a named
        # function's call ends with "stop".
        if reason == "stop" and self.called and self._plan.choice != "named":
            return "tool_calls"
        return reason


def _call_delta(call: Any) -> dict[str, Any] | None:
    entry: dict[str, Any] = {"index": call.index}
    if call.id:
        entry["id"] = call.id
        entry["type"] = "function"
    function: dict[str, str] = {}
    if call.function is not None and call.function.name:
        function["name"] = call.function.name
        function["arguments"] = call.function.arguments or ""
    elif call.function is not None and call.function.arguments:
        function["arguments"] = call.function.arguments
    if not function and "id" not in entry:
        return None
    entry["function"] = function
    return entry


def _check_tools(tools: object) -> set[str]:
    if not isinstance(tools, list) or len(tools) > _MAX_TOOLS:
        raise InvalidRequestError(f"'tools' must be a list of at most {_MAX_TOOLS} tools", "tools")
    names = set()
    for index, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(function, dict):
            raise InvalidRequestError(f"tools[{index}] must be a function tool: only those can be served here",
                                      f"tools[{index}]", "unsupported_value")
        if not isinstance(function.get("name"), str) or not function["name"]:
            raise InvalidRequestError(f"tools[{index}].function.name must be a non-empty string",
                                      f"tools[{index}].function.name")
        if not isinstance(function.get("parameters", {}), dict):
            raise InvalidRequestError(f"tools[{index}].function.parameters must be a JSON schema object",
                                      f"tools[{index}].function.parameters")
        names.add(function["name"])
    return names


def _choice_kind(choice: object, names: set[str]) -> ToolChoice:
    if choice is None:
        return "auto"
    if choice in ("none", "auto", "required"):
        return choice  # type: ignore[return-value]
    function = choice.get("function") if isinstance(choice, dict) else None
    if not isinstance(choice, dict) or choice.get("type") != "function" or not isinstance(function, dict):
        raise InvalidRequestError("'tool_choice' must be 'none', 'auto', 'required' or "
                                  "{'type': 'function', 'function': {'name': ...}}", "tool_choice")
    if function.get("name") not in names:
        raise InvalidRequestError(f"tool_choice names function {function.get('name')!r}, which is not in 'tools'",
                                  "tool_choice.function.name")
    return "named"


def _vllm_request(model: str, body: dict[str, Any]) -> Any:
    """vLLM's own ChatCompletionRequest, which its parsers read; built only for requests that may call tools."""
    from pydantic import ValidationError
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.exceptions import VLLMValidationError

    fields = {name: body[name] for name in ("messages", "tools", "tool_choice", "parallel_tool_calls", "response_format")
              if body.get(name) is not None}
    try:
        return ChatCompletionRequest.model_validate({**fields, "model": model})
    except ValidationError as error:
        first = error.errors()[0]
        location = ".".join(str(part) for part in first.get("loc", ())) or None
        raise InvalidRequestError(f"{location or 'request'}: {first.get('msg')}", location) from error
    except VLLMValidationError as error:
        raise client_error(error, "tools") from error


def _unreadable(error: Exception) -> RuntimeFailure:
    return RuntimeFailure(f"the tool parser could not read the model's answer ({type(error).__name__})")
