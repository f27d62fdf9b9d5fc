"""The fake Ollama's endpoints: request validation and the reply each route gives.

Synchronous and free of I/O: a handler gets the parsed request and returns a `Reply`; the
server in `fake_ollama` records, routes, paces and breaks it. Status codes and messages
follow Ollama's handlers (`server/routes.go`) and the `/v1` middlewares (NOTES-ollama-api §4).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from . import fake_frames as ff
from .fake_catalog import Catalogue, ModelEntry, embedding_vector

EMBED_DIM = 8
VERSION = "0.33.0"
_DIGEST = re.compile(r"sha256[:-][0-9a-fA-F]{64}")
_ZERO_DURATION = re.compile(r"[+-]?0+(\.0+)?(ns|us|µs|ms|s|m|h)?")


@dataclass(frozen=True)
class Call:
    """A routed request as handlers see it."""

    method: str
    path: str
    raw: bytes
    body: Any          # the parsed JSON body, or None
    param: str = ""    # the path parameter of /v1/models/{model} and friends


Handler = Callable[[Call], ff.Reply]


def _text_of(value: Any) -> str:
    """The text of a message content: a string, a list of parts, or a part."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "".join(_text_of(v) for v in value)
    if isinstance(value, dict):
        text = value.get("text")
        return text if isinstance(text, str) else _text_of(value.get("content"))
    return ""


def _messages_text(messages: Any) -> str:
    if not isinstance(messages, list):
        return ""
    return "".join(_text_of(m.get("content")) for m in messages if isinstance(m, dict))


def _positive_int(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return int(value) if value > 0 and value == int(value) else None


def _is_zero_duration(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, (int, float)):
        return value == 0
    return isinstance(value, str) and bool(_ZERO_DURATION.fullmatch(value.strip()))


def _go_type(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "bool"}.get(type(value), "number")


class OllamaHandlers:
    """Every Ollama route the fake serves, as (method, path) -> handler."""

    def __init__(self, catalogue: Catalogue, tokens: int) -> None:
        self.catalogue = catalogue
        self.tokens = tokens
        self.loaded: dict[str, ModelEntry] = {}   # what /api/ps lists: models used so far

    def routes(self) -> dict[tuple[str, str], Handler]:
        """Exact routes; a path ending in "/" takes one parameter segment (gin's `:param`)."""
        ok, created = self._empty(200), self._empty(201)
        table: dict[tuple[str, str], Handler] = {
            ("GET", "/"): self._root, ("HEAD", "/"): self._root,
            ("GET", "/api/version"): self._version, ("HEAD", "/api/version"): self._version,
            ("GET", "/api/status"): self._status,
            ("GET", "/api/tags"): self._tags, ("HEAD", "/api/tags"): self._tags,
            ("GET", "/api/ps"): self._ps, ("POST", "/api/show"): self._show,
            ("POST", "/api/chat"): self._chat, ("POST", "/api/generate"): self._generate,
            ("POST", "/api/embed"): self._embed, ("POST", "/api/embeddings"): self._embeddings,
            ("POST", "/api/pull"): self._pull, ("POST", "/api/push"): self._push,
            ("POST", "/api/create"): self._create, ("POST", "/api/copy"): ok,
            ("DELETE", "/api/delete"): ok, ("POST", "/api/me"): self._me,
            ("POST", "/api/signout"): ok, ("DELETE", "/api/user/keys/"): ok,
            ("HEAD", "/api/blobs/"): self._blob(ok), ("POST", "/api/blobs/"): self._blob(created),
            ("POST", "/api/experimental/web_search"): self._web_search,
            ("POST", "/api/experimental/web_fetch"): self._web_fetch,
            ("GET", "/api/experimental/model-recommendations"): self._recommendations,
            ("POST", "/v1/chat/completions"): self._v1_chat,
            ("POST", "/v1/completions"): self._v1_completions,
            ("POST", "/v1/embeddings"): self._v1_embeddings,
            ("GET", "/v1/models"): self._v1_models, ("GET", "/v1/models/"): self._v1_model,
            ("POST", "/v1/responses"): self._v1_responses,
            ("POST", "/v1/audio/transcriptions"): self._transcriptions,
            ("POST", "/v1/messages"): self._v1_messages,
        }
        return table

    # --- shared helpers ------------------------------------------------------------------

    def _resolve(self, name: str) -> ModelEntry | None:
        entry = self.catalogue.resolve(name)
        if entry is not None and not entry.cloud:
            self.loaded[entry.name] = entry
        return entry

    def _gen(self, model: str, prompt_text: str, cap: int | None) -> ff.Gen:
        """The model "wants" `tokens` tokens; an output cap below that cuts it short."""
        n = self.tokens if cap is None else min(cap, self.tokens)
        return ff.Gen(model=model, n=n, prompt=ff.prompt_token_count(prompt_text),
                      capped=n < self.tokens)

    @staticmethod
    def _object(call: Call, error: Callable[[int, str], ff.Reply],
                go_type: str) -> dict[str, Any] | ff.Reply:
        """The JSON object body, or the error gin's ShouldBindJSON would give."""
        if not call.raw.strip():
            return error(400, "missing request body" if error is ff.native_error else "EOF")
        if call.body is None:
            return error(400, "invalid character looking for beginning of value")
        if not isinstance(call.body, dict):
            return error(400, f"json: cannot unmarshal {_go_type(call.body)} into Go value"
                              f" of type {go_type}")
        return call.body

    @staticmethod
    def _stream_flag(body: dict[str, Any], default: bool) -> bool | None:
        """`stream` as Go reads it (absent/null = default); None if it is not a bool."""
        value = body.get("stream")
        if value is None:
            return default
        return value if isinstance(value, bool) else None

    @staticmethod
    def _empty(status: int) -> Handler:
        return lambda call: ff.Reply([(b"", True)], status=status, content_type="")

    @staticmethod
    def _blob(answer: Handler) -> Handler:
        def handler(call: Call) -> ff.Reply:
            if not _DIGEST.fullmatch(call.param):
                return ff.native_error(400, "invalid digest format")
            return answer(call)
        return handler

    # --- simple native routes ------------------------------------------------------------

    def _root(self, call: Call) -> ff.Reply:
        return ff.text_reply("Ollama is running")

    def _version(self, call: Call) -> ff.Reply:
        return ff.json_reply({"version": VERSION})

    def _status(self, call: Call) -> ff.Reply:
        return ff.json_reply({"cloud": {"disabled": False, "source": "default"}})

    def _tags(self, call: Call) -> ff.Reply:
        return ff.json_reply(self.catalogue.tags())

    def _ps(self, call: Call) -> ff.Reply:
        now = datetime.now(timezone.utc)
        return ff.json_reply({"models": [e.ps_entry(now) for e in self.loaded.values()]})

    def _show(self, call: Call) -> ff.Reply:
        body = self._object(call, ff.native_error, "api.ShowRequest")
        if isinstance(body, ff.Reply):
            return body
        name = body.get("model") or body.get("name")
        if not isinstance(name, str) or not name:
            return ff.native_error(400, "model is required")
        entry = self.catalogue.resolve(name)
        if entry is None:
            return ff.native_error(404, f"model '{name}' not found")
        return ff.json_reply(entry.show())

    def _me(self, call: Call) -> ff.Reply:
        return ff.json_reply({"id": "00000000-0000-4000-8000-000000000000",
                              "email": "fake@example.invalid", "name": "fake", "plan": "free"})

    def _web_search(self, call: Call) -> ff.Reply:
        result = {"title": "Fake result", "url": "https://example.invalid/",
                  "content": "The fake Ollama searched nothing."}
        return ff.json_reply({"results": [result]})

    def _web_fetch(self, call: Call) -> ff.Reply:
        return ff.json_reply({"title": "Fake page", "content": "Nothing was fetched.", "links": []})

    def _recommendations(self, call: Call) -> ff.Reply:
        return ff.json_reply({"recommendations": []})

    def _transcriptions(self, call: Call) -> ff.Reply:
        return ff.json_reply({"text": "fake transcription"}, content_type=ff.JSON, newline=True)

    # --- model management (admin) streams ------------------------------------------------

    def _progress(self, call: Call, steps: Callable[[str, str, int], list[dict[str, Any]]]
                  ) -> ff.Reply:
        body = self._object(call, ff.native_error, "api.PullRequest")
        if isinstance(body, ff.Reply):
            return body
        name = body.get("model") or body.get("name")
        if not isinstance(name, str) or not name.strip():
            return ff.native_error(400, "invalid model name")
        stream = self._stream_flag(body, True)
        if stream is None:
            return ff.native_error(400, "json: cannot unmarshal into Go struct field .stream")
        digest = "sha256:" + hashlib.sha256(name.encode()).hexdigest()
        entry = self.catalogue.resolve(name)
        total = entry.spec.size if entry is not None else 2_019_393_189
        return ff.progress(steps(digest, digest[7:19], total), stream)

    def _pull(self, call: Call) -> ff.Reply:
        return self._progress(call, lambda digest, short, total: [
            {"status": "pulling manifest"},
            {"status": f"pulling {short}", "digest": digest, "total": total},
            {"status": f"pulling {short}", "digest": digest, "total": total,
             "completed": total // 2},
            {"status": f"pulling {short}", "digest": digest, "total": total, "completed": total},
            {"status": "verifying sha256 digest"}, {"status": "writing manifest"},
            {"status": "success"}])

    def _push(self, call: Call) -> ff.Reply:
        return self._progress(call, lambda digest, short, total: [
            {"status": "retrieving manifest"},
            {"status": f"pushing {short}", "digest": digest, "total": total},
            {"status": f"pushing {short}", "digest": digest, "total": total, "completed": total},
            {"status": "pushing manifest"}, {"status": "success"}])

    def _create(self, call: Call) -> ff.Reply:
        return self._progress(call, lambda digest, short, total: [
            {"status": "gathering model components"},
            {"status": f"using existing layer {digest}"},
            {"status": "writing manifest"}, {"status": "success"}])

    # --- native inference ----------------------------------------------------------------

    def _native_inference(self, call: Call, *, generate: bool) -> ff.Reply:
        body = self._object(call, ff.native_error,
                            "api.GenerateRequest" if generate else "api.ChatRequest")
        if isinstance(body, ff.Reply):
            return body
        model = body.get("model")
        if not isinstance(model, str) or (not model and not generate):
            return ff.native_error(400, "model is required")
        entry = self._resolve(model)
        if entry is None:
            return ff.native_error(404, f"model '{model}' not found")
        stream = self._stream_flag(body, True)
        if stream is None:
            return ff.native_error(400, "json: cannot unmarshal into Go struct field .stream"
                                        " of type bool")
        prompt = body.get("prompt") if generate else body.get("messages")
        if not prompt:
            return ff.native_load(model, generate=generate,
                                  unload=_is_zero_duration(body.get("keep_alive")))
        if entry.embedding_only:
            return ff.native_error(400, f"{json.dumps(model)} does not support "
                                        f"{'generate' if generate else 'chat'}")
        options = body.get("options")
        cap = _positive_int(options.get("num_predict")) if isinstance(options, dict) else None
        if generate:
            text = _text_of(body.get("system")) + _text_of(prompt)
            gen = self._gen(model, text, cap)
            return ff.native_generate(gen, stream, with_context=body.get("raw") is not True)
        return ff.native_chat(self._gen(model, _messages_text(prompt), cap), stream)

    def _chat(self, call: Call) -> ff.Reply:
        return self._native_inference(call, generate=False)

    def _generate(self, call: Call) -> ff.Reply:
        return self._native_inference(call, generate=True)

    def _embed(self, call: Call) -> ff.Reply:
        body = self._object(call, ff.native_error, "api.EmbedRequest")
        if isinstance(body, ff.Reply):
            return body
        model, raw_input = body.get("model"), body.get("input")
        if isinstance(raw_input, str):
            inputs = [raw_input] if raw_input else []
        elif isinstance(raw_input, list) and all(isinstance(v, str) for v in raw_input):
            inputs = list(raw_input)
        elif raw_input is None:
            inputs = []
        else:
            return ff.native_error(400, "invalid input type")
        if not isinstance(model, str) or self._resolve(model) is None:
            return ff.native_error(404, f"model '{model or ''}' not found")
        if not inputs:
            return ff.json_reply({"model": model, "embeddings": []})
        dim = _positive_int(body.get("dimensions")) or EMBED_DIM
        return ff.json_reply({
            "model": model, "embeddings": [embedding_vector(t, min(dim, 4096)) for t in inputs],
            "total_duration": 2_000_000, "load_duration": 1_000_000,
            "prompt_eval_count": sum(ff.prompt_token_count(t) for t in inputs)})

    def _embeddings(self, call: Call) -> ff.Reply:
        body = self._object(call, ff.native_error, "api.EmbeddingRequest")
        if isinstance(body, ff.Reply):
            return body
        model, prompt = body.get("model"), body.get("prompt")
        if not isinstance(model, str) or not model:
            return ff.native_error(400, "model is required")
        if self._resolve(model) is None:
            return ff.native_error(404, f"model {json.dumps(model)} not found,"
                                        " try pulling it first")
        if not isinstance(prompt, str) or not prompt:
            return ff.json_reply({"embedding": []})
        return ff.json_reply({"embedding": embedding_vector(prompt, EMBED_DIM)})

    # --- OpenAI-compatible /v1 -----------------------------------------------------------

    def _v1_model_entry(self, model: Any, error: Callable[[int, str], ff.Reply],
                        chat: bool) -> ModelEntry | ff.Reply:
        if not isinstance(model, str) or not model:
            return error(400, "model is required")
        entry = self._resolve(model)
        if entry is None:
            return error(404, f"model '{model}' not found")
        if chat and entry.embedding_only:
            return error(400, f"{json.dumps(model)} does not support chat")
        return entry

    def _v1_chat(self, call: Call) -> ff.Reply:
        body = self._object(call, ff.openai_error, "openai.ChatCompletionRequest")
        if isinstance(body, ff.Reply):
            return body
        if not body.get("messages"):
            return ff.openai_error(400, "[] is too short - 'messages'")
        entry = self._v1_model_entry(body.get("model"), ff.openai_error, chat=True)
        if isinstance(entry, ff.Reply):
            return entry
        options = body.get("stream_options")
        usage = isinstance(options, dict) and options.get("include_usage") is True
        gen = self._gen(body["model"], _messages_text(body["messages"]),
                        _positive_int(body.get("max_tokens")))
        return ff.openai_chat(gen, body.get("stream") is True, usage)

    def _v1_completions(self, call: Call) -> ff.Reply:
        body = self._object(call, ff.openai_error, "openai.CompletionRequest")
        if isinstance(body, ff.Reply):
            return body
        prompt = body.get("prompt")
        if prompt is not None and not isinstance(prompt, str):
            return ff.openai_error(400, f"json: cannot unmarshal {_go_type(prompt)} into Go struct"
                                        " field CompletionRequest.prompt of type string")
        entry = self._v1_model_entry(body.get("model"), ff.openai_error, chat=True)
        if isinstance(entry, ff.Reply):
            return entry
        options = body.get("stream_options")
        usage = isinstance(options, dict) and options.get("include_usage") is True
        gen = self._gen(body["model"], prompt or "", _positive_int(body.get("max_tokens")))
        return ff.openai_completion(gen, body.get("stream") is True, usage)

    def _v1_embeddings(self, call: Call) -> ff.Reply:
        body = self._object(call, ff.openai_error, "openai.EmbedRequest")
        if isinstance(body, ff.Reply):
            return body
        fmt = body.get("encoding_format") or "float"
        if not isinstance(fmt, str) or fmt.casefold() not in ("float", "base64"):
            return ff.openai_error(400, f"Invalid value for 'encoding_format' = {fmt}. "
                                        "Supported values: ['float', 'base64'].")
        raw_input = body.get("input")
        if raw_input == "":
            raw_input = [""]
        if isinstance(raw_input, str):
            inputs = [raw_input]
        elif raw_input and isinstance(raw_input, list) and all(
                isinstance(v, str) for v in raw_input):
            inputs = list(raw_input)
        else:
            return ff.openai_error(400, "invalid input")
        entry = self._v1_model_entry(body.get("model"), ff.openai_error, chat=False)
        if isinstance(entry, ff.Reply):
            return entry
        dim = min(_positive_int(body.get("dimensions")) or EMBED_DIM, 4096)
        data = []
        for i, text in enumerate(inputs):
            vec: Any = embedding_vector(text, dim)
            if fmt.casefold() == "base64":
                vec = base64.b64encode(struct.pack(f"<{dim}f", *vec)).decode()
            data.append({"object": "embedding", "embedding": vec, "index": i})
        count = sum(ff.prompt_token_count(t) for t in inputs)
        return ff.json_reply({"object": "list", "data": data, "model": body["model"],
                              "usage": {"prompt_tokens": count, "total_tokens": count}},
                             content_type=ff.JSON, newline=True)

    def _v1_models(self, call: Call) -> ff.Reply:
        return ff.json_reply(self.catalogue.openai_list(), content_type=ff.JSON, newline=True)

    def _v1_model(self, call: Call) -> ff.Reply:
        entry = self.catalogue.resolve(call.param)
        if entry is None:
            return ff.openai_error(404, f"model '{call.param}' not found")
        return ff.json_reply(entry.openai_model(call.param), content_type=ff.JSON, newline=True)

    def _v1_responses(self, call: Call) -> ff.Reply:
        body = self._object(call, ff.openai_error, "openai.ResponsesRequest")
        if isinstance(body, ff.Reply):
            return body
        entry = self._v1_model_entry(body.get("model"), ff.openai_error, chat=True)
        if isinstance(entry, ff.Reply):
            return entry
        raw_input = body.get("input")
        text = _text_of(body.get("instructions")) + (
            raw_input if isinstance(raw_input, str) else _messages_text(raw_input))
        gen = self._gen(body["model"], text, _positive_int(body.get("max_output_tokens")))
        return ff.responses(gen, body.get("stream") is True, body)

    def _v1_messages(self, call: Call) -> ff.Reply:
        body = self._object(call, ff.anthropic_error, "anthropic.MessagesRequest")
        if isinstance(body, ff.Reply):
            return body
        if not isinstance(body.get("model"), str) or not body["model"]:
            return ff.anthropic_error(400, "model is required")
        cap = _positive_int(body.get("max_tokens"))
        if cap is None:
            return ff.anthropic_error(400, "max_tokens is required and must be positive")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return ff.anthropic_error(400, "messages is required")
        entry = self._v1_model_entry(body["model"], ff.anthropic_error, chat=True)
        if isinstance(entry, ff.Reply):
            return entry
        system = _text_of(body.get("system"))
        # Ollama's message_start carries a len/4 estimate that also counts the roles
        roles = sum(len(str(m.get("role", ""))) for m in messages if isinstance(m, dict))
        estimate = max(1, (len(system) + roles + len(_messages_text(messages))) // 4)
        gen = self._gen(body["model"], system + _messages_text(messages), cap)
        return ff.anthropic_messages(gen, body.get("stream") is True, estimate)
