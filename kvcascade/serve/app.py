"""``kvcascade serve``: an OpenAI-compatible HTTP server with a bounded KV budget per request.

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (the model's chat template),
``GET /v1/models``, ``GET /health``. Responses are the ``openai`` package's own types
(``openai.types.Completion``, ``openai.types.chat.ChatCompletion`` / ``ChatCompletionChunk``); streams are
server-sent events as OpenAI sends them (``data: {json}`` chunks, then ``data: [DONE]``; with
``stream_options.include_usage`` a last chunk with empty ``choices`` and the ``usage``).

Sampling fields: ``max_tokens`` (chat also ``max_completion_tokens``), ``temperature`` (default 1, as OpenAI),
``top_p``, ``seed``, ``stop`` (up to 4 strings), ``n`` (1 only), ``stream``, ``stream_options``; ``user`` is
accepted and not used. Any other field is refused with a 400 naming it, never silently ignored. The cache policy
and budget come from the server's flags, or per request from an extra body field
``{"kvcascade": {"policy": "cascade", "budget": 8192, "policy_args": {...}}}``; every response carries
``kvcascade`` (policy, budget, KV bytes held at peak, prefill/decode seconds).

Errors are OpenAI-style objects ``{"error": {"message", "type", "param", "code"}}`` with a 4xx status (503 when
the KV memory stayed full past the queue timeout); the server keeps serving. Each request logs one line.
"""


import asyncio
import json
import math
import time
import uuid

from ..errors import KVCascadeError
from .scheduler import Job, Scheduler, kv_bound_bytes

COMMON = {"model", "max_tokens", "temperature", "top_p", "seed", "stop", "n", "stream", "stream_options", "user",
          "kvcascade"}
COMPLETION_FIELDS = COMMON | {"prompt"}
CHAT_FIELDS = COMMON | {"messages", "max_completion_tokens"}


class RequestError(Exception):
    def __init__(self, message: str, status: int = 400, param: str | None = None, kind="invalid_request_error"):
        super().__init__(message)
        self.status, self.param, self.kind = status, param, kind


def error_body(message: str, kind: str = "invalid_request_error", param=None, code=None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class Server:
    """The model, its defaults and the scheduler behind the HTTP app (see :func:`build_app`)."""

    def __init__(self, model, tokenizer, model_name: str, policy: str = "streaming", budget: int | None = 2048,
                 policy_args: dict | None = None, chunk_size: int = 512, max_prompt_tokens: int = 32768,
                 max_new_tokens: int = 1024, kv_limit_bytes: int = 8 << 30, queue_timeout_s: float = 30.0, log=None):
        from ..policies import make_policy
        from ..policies.base import takes_budget

        self.model, self.tokenizer, self.model_name = model, tokenizer, model_name
        self.default = (policy, budget, dict(policy_args or {}))
        make_policy(policy, budget if takes_budget(policy) else None, **self.default[2])  # validates the defaults
        self.chunk_size, self.max_prompt_tokens, self.max_new_tokens = chunk_size, max_prompt_tokens, max_new_tokens
        self.created = int(time.time())
        self.scheduler = Scheduler(model, tokenizer, kv_limit_bytes, queue_timeout_s, log=log)
        self.log = self.scheduler.log

    # -- request parsing ------------------------------------------------------------------------------------
    def _policy(self, body: dict):
        from ..policies import make_policy
        from ..policies.base import takes_budget

        extra = body.get("kvcascade")
        name, budget, args = self.default
        if extra is not None:
            if not isinstance(extra, dict):
                raise RequestError("'kvcascade' must be an object {policy, budget, policy_args}", param="kvcascade")
            bad = sorted(set(extra) - {"policy", "budget", "policy_args"})
            if bad:
                raise RequestError(f"unknown field kvcascade.{bad[0]} (fields: policy, budget, policy_args)",
                                   param=f"kvcascade.{bad[0]}")
            if "policy" in extra:
                if not isinstance(extra["policy"], str):
                    raise RequestError("kvcascade.policy must be a string", param="kvcascade.policy")
                name, args = extra["policy"], {}
            if "budget" in extra:
                budget = extra["budget"]
                if not isinstance(budget, int) or isinstance(budget, bool):
                    raise RequestError("kvcascade.budget must be an integer", param="kvcascade.budget")
            if "policy_args" in extra:
                if not isinstance(extra["policy_args"], dict):
                    raise RequestError("kvcascade.policy_args must be an object", param="kvcascade.policy_args")
                args = {**args, **extra["policy_args"]}
        try:
            return make_policy(name, budget if takes_budget(name) else None, **args)
        except KVCascadeError as e:
            raise RequestError(str(e), param="kvcascade") from None

    def _sampling(self, body: dict, chat: bool) -> dict:
        allowed = CHAT_FIELDS if chat else COMPLETION_FIELDS
        bad = sorted(k for k, v in body.items() if k not in allowed and v is not None)
        if bad:
            raise RequestError(f"'{bad[0]}' is not supported by kvcascade serve (supported: "
                               f"{', '.join(sorted(allowed))})", param=bad[0])
        n = body.get("n")
        if n not in (None, 1):
            raise RequestError("only n=1 is supported", param="n")

        def number(key, default, low, high):
            v = body.get(key)
            if v is None:
                return default
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not low <= v <= high:
                raise RequestError(f"'{key}' must be a number in [{low}, {high}], got {v!r}", param=key)
            return float(v)

        temperature = number("temperature", 1.0, 0.0, 2.0)
        top_p = number("top_p", 1.0, 0.0, 1.0)
        if top_p == 0.0:
            raise RequestError("'top_p' must be above 0", param="top_p")
        limit = body.get("max_completion_tokens") if chat else None
        limit = body.get("max_tokens") if limit is None else limit
        if limit is None:
            limit = self.max_new_tokens if chat else 16  # OpenAI's completions default is 16
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise RequestError(f"'max_tokens' must be a positive integer, got {limit!r}", param="max_tokens")
        if limit > self.max_new_tokens:
            raise RequestError(f"'max_tokens' is {limit}, above this server's limit {self.max_new_tokens}",
                               param="max_tokens")
        seed = body.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise RequestError("'seed' must be an integer", param="seed")
        stop = body.get("stop")
        if stop is None:
            stop = []
        elif isinstance(stop, str):
            stop = [stop]
        elif isinstance(stop, list) and all(isinstance(s, str) for s in stop) and len(stop) <= 4:
            stop = list(stop)
        else:
            raise RequestError("'stop' must be a string or a list of up to 4 strings", param="stop")
        stream = body.get("stream") or False
        if not isinstance(stream, bool):
            raise RequestError("'stream' must be true or false", param="stream")
        opts = body.get("stream_options")
        include_usage = False
        if opts is not None:
            if not isinstance(opts, dict) or not stream:
                raise RequestError("'stream_options' needs stream=true and must be an object", param="stream_options")
            bad = sorted(set(opts) - {"include_usage"})
            if bad:
                raise RequestError(f"'stream_options.{bad[0]}' is not supported", param="stream_options")
            include_usage = bool(opts.get("include_usage"))
        model = body.get("model")
        if model is not None and model != self.model_name:
            raise RequestError(f"model '{model}' is not served here; this server serves '{self.model_name}'",
                               status=404, param="model", kind="not_found_error")
        return {"temperature": temperature, "top_p": top_p, "max_new_tokens": limit, "seed": seed, "stop": stop,
                "stream": stream, "include_usage": include_usage}

    def _prompt_ids(self, body: dict, chat: bool) -> list[int]:
        if chat:
            msgs = body.get("messages")
            if not isinstance(msgs, list) or not msgs:
                raise RequestError("'messages' must be a non-empty list", param="messages")
            clean = []
            for i, m in enumerate(msgs):
                if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                    raise RequestError(f"messages[{i}] must be an object with a 'role'", param="messages")
                content = m.get("content")
                if isinstance(content, list):
                    parts = []
                    for p in content:
                        if not (isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)):
                            raise RequestError(f"messages[{i}]: only text content parts are supported",
                                               param="messages")
                        parts.append(p["text"])
                    content = "".join(parts)
                if not isinstance(content, str):
                    raise RequestError(f"messages[{i}].content must be a string or text parts", param="messages")
                clean.append({"role": m["role"], "content": content})
            if not getattr(self.tokenizer, "chat_template", None):
                raise RequestError("this model has no chat template; use /v1/completions", param="messages")
            try:
                ids = self.tokenizer.apply_chat_template(clean, add_generation_prompt=True, tokenize=True)
            except Exception as e:  # noqa: BLE001 - templates raise on roles they do not know
                raise RequestError(f"the chat template refused these messages: {e}", param="messages") from None
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                ids = ids["input_ids"]
            ids = list(ids)
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
                prompt = prompt[0]
            if not isinstance(prompt, str):
                raise RequestError("'prompt' must be a string (one prompt per request)", param="prompt")
            if not prompt.strip():
                raise RequestError("the prompt is empty", param="prompt")
            ids = self.tokenizer(prompt).input_ids
        if not ids:
            raise RequestError("the prompt is empty", param="prompt")
        if len(ids) > self.max_prompt_tokens:
            raise RequestError(f"the prompt has {len(ids):,} tokens, above this server's limit of "
                               f"{self.max_prompt_tokens:,} (--max-prompt-tokens)", param="prompt")
        return ids

    def job(self, body: dict, chat: bool, emit) -> tuple[Job, dict]:
        if not isinstance(body, dict):
            raise RequestError("the request body must be a JSON object")
        sampling = self._sampling(body, chat)
        policy = self._policy(body)
        ids = self._prompt_ids(body, chat)
        bound = kv_bound_bytes(self.model, policy, len(ids), sampling["max_new_tokens"], self.chunk_size)
        job = Job(ids=ids, policy=policy, max_new_tokens=sampling["max_new_tokens"],
                  temperature=sampling["temperature"], top_p=sampling["top_p"], seed=sampling["seed"],
                  stop=sampling["stop"], chunk_size=self.chunk_size, kv_bound=bound, emit=emit,
                  id=("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24])
        return job, sampling


def _kv_info(job: Job, result) -> dict:
    p = job.policy
    return {"policy": p.name, "budget": getattr(p, "budget", None), "params": p.params(),
            "kv_bytes_peak": result.kv_bytes_peak if result else 0, "kv_bytes_full": result.kv_bytes_full if result else 0,
            "kv_bytes_reserved": job.kv_bound, "prefill_s": result.prefill_s if result else 0.0,
            "decode_s": result.decode_s if result else 0.0, "decode_batch": result.decode_batch if result else 0}


def build_app(server: Server):
    """The FastAPI application around ``server``."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse
    from openai.types import Completion, CompletionChoice, CompletionUsage
    from openai.types.chat import ChatCompletion, ChatCompletionChunk

    app = FastAPI(title="kvcascade serve", version="1")

    def err(e: RequestError) -> JSONResponse:
        return JSONResponse(error_body(str(e), e.kind, e.param), status_code=e.status)

    async def read_body(request: Request) -> dict:
        raw = await request.body()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise RequestError("the request body is not valid UTF-8") from None
        try:
            return json.loads(text)
        except ValueError as e:
            raise RequestError(f"the request body is not valid JSON: {e}") from None

    def usage(job, result) -> CompletionUsage:
        n = result.new_tokens if result else 0
        return CompletionUsage(prompt_tokens=len(job.ids), completion_tokens=n, total_tokens=len(job.ids) + n)

    def log_line(job, status, result, extra=""):
        info = _kv_info(job, result)
        server.log(f"kvcascade serve: {job.id} {status} prompt={len(job.ids)} new={result.new_tokens if result else 0} "
                   f"policy={info['policy']} budget={info['budget']} kv_peak={info['kv_bytes_peak'] / 2**20:.1f}MiB "
                   f"reserved={job.kv_bound / 2**20:.1f}MiB prefill={info['prefill_s']:.2f}s "
                   f"decode={info['decode_s']:.2f}s{extra}")

    async def handle(request: Request, chat: bool):
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def emit(kind, payload):  # from the inference thread
            loop.call_soon_threadsafe(queue.put_nowait, (kind, payload))

        try:
            body = await read_body(request)
            job, sampling = server.job(body, chat, emit)
            server.scheduler.submit(job)
        except RequestError as e:
            return err(e)
        except KVCascadeError as e:
            return err(RequestError(str(e)))
        created = int(time.time())
        model = server.model_name

        def chunk_obj(text=None, finish=None, role=False, use=None, final_info=None):
            if chat:
                delta = {}
                if role:
                    delta["role"] = "assistant"
                if text is not None:
                    delta["content"] = text
                choices = [] if use is not None else [{"index": 0, "delta": delta, "finish_reason": finish,
                                                        "logprobs": None}]
                obj = ChatCompletionChunk(id=job.id, object="chat.completion.chunk", created=created, model=model,
                                          choices=choices, usage=use)
            else:
                choices = [] if use is not None else [CompletionChoice.model_construct(
                    index=0, text=text or "", finish_reason=finish, logprobs=None)]
                obj = Completion.model_construct(id=job.id, object="text_completion", created=created, model=model,
                                                 choices=choices, usage=use)
            data = obj.model_dump(mode="json", exclude_none=False)
            if final_info is not None:
                data["kvcascade"] = final_info
            return f"data: {json.dumps(data)}\n\n"

        if sampling["stream"]:
            async def events():
                result, status = None, "cancelled"
                try:
                    if chat:
                        yield chunk_obj(text="", role=True)
                    while True:
                        kind, payload = await queue.get()
                        if kind == "piece":
                            yield chunk_obj(text=payload)
                        elif kind == "done":
                            result, status = payload, "ok"
                            info = _kv_info(job, result)
                            yield chunk_obj(text=None if chat else "", finish=result.finish_reason, final_info=info)
                            if sampling["include_usage"]:
                                yield chunk_obj(use=usage(job, result), final_info=info)
                            yield "data: [DONE]\n\n"
                            return
                        elif kind in ("error", "rejected"):
                            status = kind
                            yield f"data: {json.dumps(error_body(payload, 'server_error'))}\n\n"
                            return
                        else:
                            return
                finally:
                    job.cancel()  # no-op once finished; frees the cache of an abandoned stream
                    log_line(job, status, result, " stream")

            return StreamingResponse(events(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

        pieces, result, status = [], None, "cancelled"
        try:
            while True:
                try:
                    kind, payload = await asyncio.wait_for(queue.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return JSONResponse(error_body("client disconnected"), status_code=499)
                    continue
                if kind == "piece":
                    pieces.append(payload)
                elif kind == "done":
                    result, status = payload, "ok"
                    break
                elif kind == "rejected":
                    status = "rejected"
                    return JSONResponse(error_body(payload, "server_busy"), status_code=503)
                elif kind == "error":
                    status = "error"
                    return JSONResponse(error_body(payload, "server_error"), status_code=500)
                else:
                    return JSONResponse(error_body("cancelled"), status_code=499)
        finally:
            job.cancel()
            log_line(job, status, result)
        info = _kv_info(job, result)
        if chat:
            obj = ChatCompletion(id=job.id, object="chat.completion", created=created, model=model,
                                 choices=[{"index": 0, "finish_reason": result.finish_reason, "logprobs": None,
                                           "message": {"role": "assistant", "content": result.text}}],
                                 usage=usage(job, result))
        else:
            obj = Completion(id=job.id, object="text_completion", created=created, model=model,
                             choices=[CompletionChoice(index=0, text=result.text, finish_reason=result.finish_reason,
                                                       logprobs=None)], usage=usage(job, result))
        return JSONResponse({**obj.model_dump(mode="json"), "kvcascade": info})

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await handle(request, chat=True)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": server.model_name, "object": "model", "created": server.created,
                                            "owned_by": "kvcascade"}]}

    @app.get("/health")
    async def health():
        info = {"status": "ok", "model": server.model_name, **server.scheduler.stats()}
        device = getattr(server.model, "device", None)
        if device is not None and device.type == "cuda":  # what the whole process holds on the GPU, at peak too
            import torch

            info["device"] = torch.cuda.get_device_name(device)
            info["device_memory_bytes"] = torch.cuda.memory_allocated(device)
            info["device_memory_peak_bytes"] = torch.cuda.max_memory_allocated(device)
        return info

    @app.exception_handler(404)
    async def not_found(request, exc):
        return JSONResponse(error_body(f"no route {request.method} {request.url.path}", "not_found_error"),
                            status_code=404)

    @app.exception_handler(405)
    async def not_allowed(request, exc):
        return JSONResponse(error_body(f"method {request.method} not allowed on {request.url.path}"),
                            status_code=405)

    return app
