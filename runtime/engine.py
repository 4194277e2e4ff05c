"""One vLLM engine (AsyncLLM) running inside the gateway process, fed OpenAI-shaped requests.

vLLM is imported only when an engine starts, so a gateway without embedded models never pays for it.
The engine core runs in a child process that vLLM spawns; `stop()` (or interpreter exit) ends it.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import shutil
import threading
from collections.abc import AsyncIterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from runtime.answers import Answer, ResponseShape
from runtime.embeddings import embedding_response, parse_embedding_inputs
from runtime.engine_args import build_engine_args, prepare_environment
from runtime.errors import EngineUnavailableError, InvalidRequestError, RuntimeFailure, client_error
from runtime.logprobs import Logprobs
from runtime.models import resolve_model
from runtime.openai_io import Sampling, parse_chat_messages, parse_completion_prompt, parse_sampling
from runtime.tools import ChoiceTools, ToolPlan, ToolSupport, compose_parser, template_takes_tools

# vLLM's settings travel to its child processes through the environment, so engines start one at a time.
_ENGINE_START_LOCK = threading.Lock()


class EngineState(StrEnum):
    IDLE = "idle"  # a lazy engine that no request has needed yet
    STARTING = "starting"
    READY = "ready"
    FAILED = "failed"
    STOPPED = "stopped"


@dataclass(frozen=True, slots=True)
class EngineStatus:
    state: EngineState
    cause: str | None = None

    def __str__(self) -> str:
        return f"{self.state}: {self.cause}" if self.cause else str(self.state)


@dataclass(slots=True)
class EngineLoad:
    """The scheduler's latest figures, as the engine core last reported them."""

    running: int = 0
    waiting: int = 0
    kv_cache_usage: float = 0.0


class EmbeddedEngine:
    """Serves one model; every public coroutine is safe to call concurrently from the event loop.

    `tool_parser` names the vLLM tool parser that finds the calls the model writes (tool_choice "auto"), held to
    the tools as `tool_strict_level` says (see `runtime.tools.compose_parser`); `chat_template` is a Jinja file
    that replaces the model folder's template.
    """

    def __init__(self, model: str, engine_args: Mapping[str, object] | None = None, served_model_name: str | None = None,
                 *, tool_parser: str | None = None, tool_strict_level: str = "parameter",
                 chat_template: str | None = None) -> None:
        self.model = model
        self.name = served_model_name or model
        self.load = EngineLoad()
        self.max_model_len = 0
        self._served_model_name = served_model_name
        self._overrides = dict(engine_args or {})
        self._tool_parser = tool_parser
        self._tool_strict_level = tool_strict_level
        self._chat_template = chat_template
        self._tools: ToolSupport | None = None
        self._logprobs: Logprobs | None = None
        self._status = EngineStatus(EngineState.IDLE)
        self._start_task: asyncio.Task[None] | None = None
        self._llm: Any = None
        self._tokenizer: Any = None
        self._priority_scheduling = False
        self._socket_dir: Path | None = None
        self._engine_processes: list[Any] = []  # psutil.Process objects, which survive pid reuse
        # One thread: HF tokenizers are not safe to share across threads, and templating must not block the loop.
        self._tokenize_pool = ThreadPoolExecutor(1, thread_name_prefix="lockgate-tokenize")

    @property
    def status(self) -> EngineStatus:
        return self._status

    async def start(self) -> None:
        """Start the engine once (concurrent callers share that start); raise EngineUnavailableError if it fails."""
        if self._start_task is None:
            if self._status.state is EngineState.STOPPED:
                raise EngineUnavailableError(f"the embedded engine for {self.name} is stopped", str(self._status))
            self._status = EngineStatus(EngineState.STARTING)
            self._start_task = asyncio.create_task(self._start())
        # Shielded: a client that gives up waiting must not cancel the start for everyone else.
        await asyncio.shield(self._start_task)

    async def stop(self) -> None:
        """Shut the engine core down and wait for its processes to exit; safe to call more than once."""
        if self._start_task is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(self._start_task)
        llm, self._llm = self._llm, None
        self._status = EngineStatus(EngineState.STOPPED)
        if llm is not None:
            atexit.unregister(llm.shutdown)
            if llm.output_handler is not None:
                # Otherwise it sees the engine core exit first and logs that as a failure.
                llm.output_handler.cancel()
            await asyncio.to_thread(llm.shutdown)
            await asyncio.to_thread(_reap, self._engine_processes)
            # vLLM keeps a frame holding the AsyncLLM alive until interpreter exit, when its __del__ calls
            # shutdown() again with vLLM's module globals already gone and prints a TypeError.
            llm.shutdown = _already_shut_down
        if self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)
        self._tokenize_pool.shutdown(wait=False)

    async def chat(self, body: dict[str, Any], request_id: str, priority: int = 0) -> dict[str, Any]:
        return await self._complete(ResponseShape(True, request_id, self.name), body, request_id, priority)

    async def completions(self, body: dict[str, Any], request_id: str, priority: int = 0) -> dict[str, Any]:
        return await self._complete(ResponseShape(False, request_id, self.name), body, request_id, priority)

    def stream_chat(self, body: dict[str, Any], request_id: str, priority: int = 0) -> AsyncIterator[dict[str, Any]]:
        return self._stream(ResponseShape(True, request_id, self.name), body, request_id, priority)

    def stream_completions(self, body: dict[str, Any], request_id: str, priority: int = 0) -> AsyncIterator[dict[str, Any]]:
        return self._stream(ResponseShape(False, request_id, self.name), body, request_id, priority)

    async def embeddings(self, body: dict[str, Any], request_id: str, priority: int = 0) -> dict[str, Any]:
        """An OpenAI `list` of embeddings; needs an engine started with `runner: pooling` (and `convert: embed`
        for a model that is not an embedding model by architecture)."""
        await self._ready()
        if self._llm.model_config.runner_type != "pooling":
            raise InvalidRequestError(f"model {self.name} does not serve embeddings", "model", "unsupported_value")
        inputs = parse_embedding_inputs(body)
        loop = asyncio.get_running_loop()
        prompts = [
            item if isinstance(item, list) else await loop.run_in_executor(self._tokenize_pool, self._text_prompt_ids, item)
            for item in inputs
        ]
        if too_long := [index for index, ids in enumerate(prompts) if len(ids) > self.max_model_len]:
            raise InvalidRequestError(
                f"input {too_long[0]} is longer than this model's maximum context length of {self.max_model_len} tokens",
                "input",
                "context_length_exceeded",
            )
        vectors = await asyncio.gather(
            *(self._embed(ids, f"{request_id}-{index}", priority) for index, ids in enumerate(prompts))
        )
        return embedding_response(self.name, vectors, sum(map(len, prompts)), body.get("encoding_format") or "float")

    async def _embed(self, prompt_ids: list[int], request_id: str, priority: int) -> Any:
        from vllm.inputs import tokens_input
        from vllm.pooling_params import PoolingParams

        result = None
        # vLLM aborts the request itself when this coroutine is cancelled.
        async for output in self._llm.encode(
            tokens_input(prompt_ids),
            PoolingParams(task="embed"),
            request_id,
            priority=priority if self._priority_scheduling else 0,
        ):
            result = output.outputs.data
        return result

    async def _complete(self, shape: ResponseShape, body: dict[str, Any], request_id: str, priority: int) -> dict:
        answer, prompt_ids, params = await self._prepare(shape, body, streaming=False)
        finals: dict[int, Any] = {}
        async with contextlib.aclosing(self._generate(prompt_ids, params, request_id, priority)) as outputs:
            async for output in outputs:
                answer.note_cached(output)
                finals.update((choice.index, choice) for choice in output.outputs)
        return answer.whole(finals.values())

    async def _stream(
        self, shape: ResponseShape, body: dict[str, Any], request_id: str, priority: int
    ) -> AsyncIterator[dict[str, Any]]:
        answer, prompt_ids, params = await self._prepare(shape, body, streaming=True)
        first = True
        async with contextlib.aclosing(self._generate(prompt_ids, params, request_id, priority)) as outputs:
            async for output in outputs:
                for chunk in answer.chunks(output, first):
                    yield chunk
                first = False
        yield shape.usage_chunk(answer.usage())

    async def _generate(self, prompt_ids: list[int], params: Any, request_id: str, priority: int) -> AsyncIterator:
        """The engine's outputs for one request; closing or cancelling it aborts the request in the engine."""
        from vllm.exceptions import VLLMClientError
        from vllm.inputs import tokens_input
        from vllm.v1.engine.exceptions import EngineDeadError

        llm = self._llm
        finished = False
        stream = llm.generate(
            # Already tokenized with the model's chat template: handed over as engine input, skipping the renderer.
            tokens_input(prompt_ids),
            params,
            request_id,
            priority=priority if self._priority_scheduling else 0,
        )
        try:
            async with contextlib.aclosing(stream):
                async for output in stream:
                    finished = output.finished
                    yield output
        except VLLMClientError as error:
            raise client_error(error) from error
        except EngineDeadError as error:
            self._status = EngineStatus(EngineState.FAILED, f"the engine process died: {error}")
            raise EngineUnavailableError(f"the embedded engine for {self.name} died", str(self._status)) from error
        finally:
            if not finished and self._llm is llm:
                # Frees the request's KV cache now rather than when the abandoned stream is collected.
                await llm.abort(request_id)

    async def _prepare(self, shape: ResponseShape, body: dict[str, Any], streaming: bool) -> tuple[Answer, list[int], Any]:
        await self._ready()
        sampling = parse_sampling(body, shape.chat)
        loop = asyncio.get_running_loop()
        plan: ToolPlan | None = None
        readers: list[ChoiceTools | None] | None = None
        if shape.chat:
            prompt_ids, plan, readers = await loop.run_in_executor(self._tokenize_pool, self._chat_input, body, sampling.n)
        else:
            prompt = parse_completion_prompt(body)
            prompt_ids = (
                prompt
                if isinstance(prompt, list)
                else await loop.run_in_executor(self._tokenize_pool, self._text_prompt_ids, prompt)
            )
        room = self.max_model_len - len(prompt_ids)
        if room < 1:
            raise InvalidRequestError(
                f"this model's maximum context length is {self.max_model_len} tokens, "
                f"but the prompt has {len(prompt_ids)} tokens",
                "messages" if shape.chat else "prompt",
                "context_length_exceeded",
            )
        # A call forced by tool_choice (or the parser's syntax for "auto") settles the answer's form; else response_format.
        structured = plan.structured if plan is not None and plan.request is not None else sampling.structured
        answer = Answer(shape, prompt_ids, sampling.n, readers, self._logprobs, sampling.logprobs)
        return answer, prompt_ids, self._sampling_params(sampling, room, streaming, structured)

    def _sampling_params(self, sampling: Sampling, room: int, streaming: bool, structured: Any) -> Any:
        from vllm.exceptions import VLLMClientError
        from vllm.sampling_params import RequestOutputKind, SamplingParams, StructuredOutputsParams

        try:
            if isinstance(structured, dict):
                structured = StructuredOutputsParams(**structured)
            return SamplingParams(
                n=sampling.n,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                stop=sampling.stop,
                seed=sampling.seed,
                presence_penalty=sampling.presence_penalty,
                frequency_penalty=sampling.frequency_penalty,
                ignore_eos=sampling.ignore_eos,
                min_tokens=min(sampling.min_tokens, room),
                # Clamped rather than refused: the gateway sends a default max_tokens that may exceed small contexts.
                max_tokens=min(sampling.max_tokens or room, room),
                logprobs=sampling.logprobs,
                structured_outputs=structured,
                output_kind=RequestOutputKind.DELTA if streaming else RequestOutputKind.FINAL_ONLY,
            )
        except VLLMClientError as error:
            raise client_error(error) from error
        except ValueError as error:
            raise InvalidRequestError(str(error)) from error

    def _chat_input(self, body: dict[str, Any], n: int) -> tuple[list[int], ToolPlan | None, list[ChoiceTools | None] | None]:
        """The prompt's token ids, the request's tool handling and each choice's reading of tool calls; runs in the
        tokenizer's thread, as parsers read the tokenizer when they are made."""
        messages = parse_chat_messages(body)
        if not self._tokenizer.chat_template:
            raise InvalidRequestError(f"model {self.name} has no chat template; use the completions endpoint",
                                      "messages", "unsupported_value")
        plan = self._tools.plan(body)
        try:
            text = self._tokenizer.apply_chat_template(messages, tools=plan.tools if plan else None, tokenize=False,
                                                       add_generation_prompt=True)
        except Exception as error:  # templates refuse what they cannot render by raising
            raise InvalidRequestError(f"the chat template of model {self.name} cannot render these messages: {error}",
                                      "messages") from error
        prompt_ids = self._tokenizer.encode(text, add_special_tokens=False)
        return prompt_ids, plan, [plan.for_choice(prompt_ids) for _ in range(n)] if plan else None

    def _text_prompt_ids(self, prompt: str) -> list[int]:
        return self._tokenizer.encode(prompt)

    async def _ready(self) -> None:
        if self._status.state in (EngineState.IDLE, EngineState.STARTING):
            await self.start()
        if self._status.state is not EngineState.READY:
            raise EngineUnavailableError(f"the embedded engine for {self.name} is {self._status}", str(self._status))

    async def _start(self) -> None:
        try:
            self._llm, self._tokenizer = await asyncio.to_thread(self._create)
        except Exception as error:
            cause = str(error) if isinstance(error, RuntimeFailure) else f"{type(error).__name__}: {error}"
            self._status = EngineStatus(EngineState.FAILED, cause)
            raise EngineUnavailableError(
                f"the embedded engine for {self.name} failed to start: {cause}", str(self._status)
            ) from error
        self.max_model_len = self._llm.model_config.max_model_len
        self._priority_scheduling = self._llm.vllm_config.scheduler_config.policy == "priority"
        self._status = EngineStatus(EngineState.READY)

    def _create(self) -> tuple[Any, Any]:
        path = resolve_model(self.model)
        import psutil

        with _ENGINE_START_LOCK:
            self._socket_dir = prepare_environment()
            before = set(psutil.Process().children(recursive=True))
            created = self._create_engine(path)
            self._engine_processes = [
                process
                for process in psutil.Process().children(recursive=True)
                # The standard library's resource tracker is shared by the whole process and ends with it.
                if process not in before and "resource_tracker" not in " ".join(process.cmdline())
            ]
            return created

    def _create_engine(self, path: Path) -> tuple[Any, Any]:
        from transformers import AutoTokenizer
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.platforms import current_platform
        from vllm.v1.engine.async_llm import AsyncLLM

        args = build_engine_args(path, self._overrides, self._served_model_name, current_platform.is_cpu())
        try:
            engine_args = AsyncEngineArgs(**args)
        except TypeError as error:
            raise InvalidRequestError(f"bad engine argument: {error}", "engine") from error
        tokenizer = AutoTokenizer.from_pretrained(path)
        if self._chat_template is not None:
            try:
                tokenizer.chat_template = Path(self._chat_template).read_text()
            except OSError as error:
                raise RuntimeFailure(f"chat_template {self._chat_template}: {error.strerror or error}") from error
        # Before the engine loads: a tool parser that cannot serve this tokenizer fails the start in a moment.
        parser_cls = compose_parser(tokenizer, self._tool_parser, self.name, self._tool_strict_level)
        llm = AsyncLLM.from_engine_args(engine_args, stat_loggers=[_load_recorder(self.load)])
        # A gateway that exits without stop() must still not leave the engine core process behind.
        atexit.register(llm.shutdown)
        self._tools = ToolSupport(self.name, tokenizer, parser_cls, self._tool_parser, template_takes_tools(tokenizer),
                                  llm.model_config)
        self._logprobs = Logprobs(tokenizer)
        return llm, tokenizer


def _reap(processes: list[Any]) -> None:
    """Wait for the engine's processes to exit; vLLM sends SIGKILL to stragglers but does not wait for them."""
    import psutil

    _, alive = psutil.wait_procs(processes, timeout=10)
    for process in alive:
        process.kill()
    psutil.wait_procs(alive, timeout=10)


def _already_shut_down(timeout: float | None = None) -> None:
    return None


def _load_recorder(load: EngineLoad) -> Any:
    from vllm.v1.metrics.loggers import StatLoggerBase

    class LoadRecorder(StatLoggerBase):
        def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
            pass

        def record(self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None, engine_idx: int = 0):
            if scheduler_stats is not None:
                load.running = scheduler_stats.num_running_reqs
                load.waiting = scheduler_stats.num_waiting_reqs
                load.kv_cache_usage = scheduler_stats.kv_cache_usage

        def log_engine_initialized(self) -> None:
            pass

    return LoadRecorder
