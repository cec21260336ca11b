"""Request bodies of the OpenAI API, checked: each mistake is a RequestError naming the field at fault.

Chat completions become a question (the texts of the messages joined by newlines, in order) and at most one image;
image generations a caption. Images come only inline, as ``data:`` URLs: the server reads no file and fetches no URL.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import secrets
import warnings
from dataclasses import dataclass, field
from typing import Any

from ..errors import OmnicoreError
from ..generation.api import t2i_sampling_options
from ..generation.sampling import Sampling
from ..inputs import MAX_IMAGE_PIXELS, first_line

IMAGE_TYPES = {"image/png": "PNG", "image/jpeg": "JPEG", "image/jpg": "JPEG", "image/webp": "WEBP"}
MAX_STOPS = 4  # as the OpenAI API
MAX_STOP_CHARS = 256


class RequestError(OmnicoreError):
    """A request the server refuses: HTTP ``status`` with an OpenAI-style error body."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 kind: str = "invalid_request_error", code: str | None = None) -> None:
        super().__init__(message)
        self.message, self.param, self.status, self.kind, self.code = message, param, status, kind, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class Limits:
    """What the server accepts; the model's own limits come from the model."""

    max_n: int = 16  # the Python API decodes 16 sequences a batch: one noise stream per request up to there
    max_tokens: int = 1024  # answer tokens, also where the model's positions would allow more
    default_max_tokens: int = 256


@dataclass
class ChatRequest:
    question: str
    question_ids: list[int]
    image: Any  # a PIL image or None
    n: int
    sampling: Sampling
    stops: list[str]
    stream: bool
    include_usage: bool
    prompt_tokens: int
    seeded: bool


@dataclass
class ImageRequest:
    prompt: str
    n: int
    sampling: Sampling
    guidance_scale: float
    negative_prompt: str | None
    seeded: bool
    extra: dict = field(default_factory=dict)


# --- field checks ----------------------------------------------------------------------------------------
def _type_name(v: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
            dict: "an object", type(None): "null"}.get(type(v), type(v).__name__)


def _int(body: dict, key: str, default: int | None, low: int | None = None, high: int | None = None,
         param: str | None = None) -> int | None:
    v = body.get(key, default)
    if v is None:
        return default
    param = param or key
    if isinstance(v, bool) or not isinstance(v, int):
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        else:
            raise RequestError(f"{param}: must be an integer, got {_type_name(v)}", param)
    if low is not None and v < low:
        raise RequestError(f"{param}: must be at least {low}, got {v}", param)
    if high is not None and v > high:
        raise RequestError(f"{param}: must be at most {high}, got {v}", param)
    return v


def _number(body: dict, key: str, default: float | None, low: float | None = None, high: float | None = None,
            low_open: bool = False) -> float | None:
    v = body.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise RequestError(f"{key}: must be a number, got {_type_name(v)}", key)
    v = float(v)
    if not math.isfinite(v):
        raise RequestError(f"{key}: must be a finite number", key)
    if low is not None and (v <= low if low_open else v < low):
        raise RequestError(f"{key}: must be {'above' if low_open else 'at least'} {low:g}, got {v:g}", key)
    if high is not None and v > high:
        raise RequestError(f"{key}: must be at most {high:g}, got {v:g}", key)
    return v


def _bool(body: dict, key: str, default: bool) -> bool:
    v = body.get(key, default)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise RequestError(f"{key}: must be true or false, got {_type_name(v)}", key)
    return v


def _seed(body: dict) -> tuple[int, bool]:
    seed = _int(body, "seed", None, -(2**63), 2**64 - 1)  # what torch.Generator.manual_seed takes
    if seed is None:
        return secrets.randbits(63), False
    return seed, True


def _object(body: Any) -> dict:
    if not isinstance(body, dict):
        raise RequestError(f"the request body must be a JSON object, got {_type_name(body)}")
    return body


def check_model(body: dict, served: str, required: bool) -> None:
    name = body.get("model")
    if name is None and not required:
        return
    if name is None:
        raise RequestError("model: missing; this server serves the model " + repr(served), "model")
    if not isinstance(name, str):
        raise RequestError(f"model: must be a string, got {_type_name(name)}", "model")
    if name != served:
        raise RequestError(f"model {name!r} does not exist here; this server serves {served!r}", "model", 404,
                           code="model_not_found")


def _unsupported(body: dict, allowed: set[str], ignored: set[str]) -> None:
    for key in body:
        if key not in allowed and key not in ignored:
            raise RequestError(f"{key}: unrecognized request argument", key)


# --- images inside messages -------------------------------------------------------------------------------
def decode_data_url(url: Any, param: str, max_pixels: int = MAX_IMAGE_PIXELS):
    """A ``data:image/...;base64,`` URL -> an RGB PIL image, its size checked before its pixels are decoded."""
    from PIL import Image, UnidentifiedImageError

    if not isinstance(url, str):
        raise RequestError(f"{param}: must be a string, got {_type_name(url)}", param)
    if not url.startswith("data:"):
        scheme = url.split(":", 1)[0][:16] if ":" in url else "a path"
        raise RequestError(f"{param}: only data: URLs with a base64 image are accepted (this server fetches no URL "
                           f"and reads no file; got {scheme})", param)
    head, sep, data = url[5:].partition(",")
    parts = head.split(";")
    mime = parts[0].lower()
    if not sep or "base64" not in parts[1:]:
        raise RequestError(f"{param}: expected data:<image type>;base64,<data>", param)
    if mime not in IMAGE_TYPES:
        raise RequestError(f"{param}: image type {mime or 'missing'!r} is not accepted; use "
                           f"{', '.join(sorted(set(IMAGE_TYPES) - {'image/jpg'}))}", param)
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(f"{param}: the data is not valid base64", param) from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(raw), formats=sorted(set(IMAGE_TYPES.values())))
    except UnidentifiedImageError:
        raise RequestError(f"{param}: not a decodable PNG, JPEG or WebP image", param) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise RequestError(f"{param}: image has more than {max_pixels:,} pixels", param) from None
    except Exception as exc:
        raise RequestError(f"{param}: cannot read the image: {first_line(exc)}", param) from None
    with im:
        w, h = im.size
        if w <= 0 or h <= 0 or w * h > max_pixels:
            raise RequestError(f"{param}: image is {w}x{h} pixels; at most {max_pixels:,} are accepted", param)
        try:
            im.load()
            if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
                rgba = im.convert("RGBA")  # transparency over white, as omnicore.inputs.open_image
                background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                return Image.alpha_composite(background, rgba).convert("RGB")
            return im.convert("RGB")
        except Exception as exc:  # truncated or corrupt pixel data
            raise RequestError(f"{param}: cannot decode the image: {first_line(exc)}", param) from None


def _messages(body: dict) -> tuple[str, Any]:
    messages = body.get("messages")
    if messages is None:
        raise RequestError("messages: missing", "messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages: must be a non-empty array of messages", "messages")
    texts: list[str] = []
    image, image_at = None, None
    for i, msg in enumerate(messages):
        at = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise RequestError(f"{at}: must be an object with role and content, got {_type_name(msg)}", at)
        role = msg.get("role")
        if role not in ("system", "developer", "user", "assistant"):
            raise RequestError(f"{at}.role: must be system, developer, user or assistant, got {role!r}", f"{at}.role")
        content = msg.get("content")
        if isinstance(content, str):
            texts.append(content)
            continue
        if content is None and role == "assistant":
            continue
        if not isinstance(content, list):
            raise RequestError(f"{at}.content: must be a string or an array of parts, got {_type_name(content)}",
                               f"{at}.content")
        for j, part in enumerate(content):
            p = f"{at}.content[{j}]"
            if not isinstance(part, dict):
                raise RequestError(f"{p}: must be an object, got {_type_name(part)}", p)
            kind = part.get("type")
            if kind == "text":
                if not isinstance(part.get("text"), str):
                    raise RequestError(f"{p}.text: must be a string", f"{p}.text")
                texts.append(part["text"])
            elif kind == "image_url":
                if role != "user":
                    raise RequestError(f"{p}: images are accepted in user messages only", p)
                if image_at is not None:
                    raise RequestError(f"{p}: this model reads one image per request (the first is at {image_at})", p)
                spec = part.get("image_url")
                url = spec.get("url") if isinstance(spec, dict) else spec
                image, image_at = decode_data_url(url, f"{p}.image_url.url"), p
            else:
                raise RequestError(f"{p}.type: must be text or image_url, got {kind!r}", f"{p}.type")
    return "\n".join(texts), image


def _stops(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise RequestError("stop: must be a string or an array of strings", "stop")
    if len(stops) > MAX_STOPS:
        raise RequestError(f"stop: at most {MAX_STOPS} stop sequences, got {len(stops)}", "stop")
    if any(not s or len(s) > MAX_STOP_CHARS for s in stops):
        raise RequestError(f"stop: each stop sequence must have 1 to {MAX_STOP_CHARS} characters", "stop")
    return stops


CHAT_FIELDS = {"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "stop",
               "n", "stream", "stream_options", "top_k", "min_p", "repetition_penalty", "frequency_penalty",
               "presence_penalty", "logprobs"}
IGNORED = {"user", "metadata", "store", "service_tier", "parallel_tool_calls"}


def parse_chat(body: Any, served: str, model, limits: Limits) -> ChatRequest:
    """Check a chat completion body against the OpenAI API, the server's ``limits`` and the model."""
    body = _object(body)
    check_model(body, served, required=True)
    _unsupported(body, CHAT_FIELDS, IGNORED)
    for key in ("frequency_penalty", "presence_penalty"):
        if _number(body, key, 0.0, -2.0, 2.0) != 0.0:
            raise RequestError(f"{key}: not supported by this server (use repetition_penalty)", key)
    if _bool(body, "logprobs", False):
        raise RequestError("logprobs: not supported by this server", "logprobs")
    question, image = _messages(body)
    if image is not None and model.encoder is None:
        raise RequestError("messages: this model has no image encoder; it answers text-only questions", "messages")
    question_ids = model.layout.question_ids(question)
    table = model.heads["mmu_positions"] if "mmu_positions" in model.heads else None
    capacity = getattr(table, "num_positions", None)
    room = limits.max_tokens
    if capacity is not None:
        room = min(room, capacity - model.mmu_prefix_len - len(question_ids))
        if room < 1:
            raise RequestError(f"messages: the question has {len(question_ids)} tokens, but this model reads at most "
                               f"{capacity - model.mmu_prefix_len - 1} ({capacity} positions, "
                               f"{model.mmu_prefix_len} of them for the image)", "messages",
                               code="context_length_exceeded")
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _int(body, key, None, 1)
    if max_tokens is not None and max_tokens > room:
        raise RequestError(f"{key}: {max_tokens}, but after a question of {len(question_ids)} tokens this model has "
                           f"room for at most {room} answer tokens", key, code="context_length_exceeded")
    if max_tokens is None:
        max_tokens = min(room, limits.default_max_tokens)
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", None, 0.0, 1.0, low_open=True)
    top_k = _int(body, "top_k", None, 1)
    min_p = _number(body, "min_p", None, 0.0, 1.0)
    penalty = _number(body, "repetition_penalty", 1.0, 0.0, None, low_open=True)
    n = _int(body, "n", 1, 1, limits.max_n)
    seed, seeded = _seed(body)
    stream = _bool(body, "stream", False)
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not isinstance(options, dict):
            raise RequestError("stream_options: must be an object", "stream_options")
        if not stream:
            raise RequestError("stream_options: only allowed with stream: true", "stream_options")
        include_usage = _bool(options, "include_usage", False)
    sampling = Sampling(temperature=temperature, top_k=top_k, top_p=None if top_p == 1.0 else top_p, min_p=min_p,
                        repetition_penalty=penalty, seed=seed, max_new_tokens=max_tokens)
    return ChatRequest(question, question_ids, image, n, sampling, _stops(body), stream, include_usage,
                       model.mmu_prefix_len + len(question_ids), seeded)


IMAGE_FIELDS = {"model", "prompt", "n", "size", "response_format", "guidance_scale", "negative_prompt", "seed",
                "temperature", "top_k", "top_p", "quality", "output_format"}


def model_size(model) -> str:
    return f"{model.image_size}x{model.image_size}"


def parse_images(body: Any, served: str, model, limits: Limits) -> ImageRequest:
    """Check an image generation body against the OpenAI API, the server's ``limits`` and the model."""
    body = _object(body)
    check_model(body, served, required=False)
    _unsupported(body, IMAGE_FIELDS, IGNORED | {"style", "background", "moderation"})
    prompt = body.get("prompt")
    if prompt is None:
        raise RequestError("prompt: missing", "prompt")
    if not isinstance(prompt, str):
        raise RequestError(f"prompt: must be a string, got {_type_name(prompt)}", "prompt")
    limit = model.layout.max_caption_tokens
    for key in ("prompt", "negative_prompt"):
        text = body.get(key)
        if key == "negative_prompt" and text is not None and not isinstance(text, str):
            raise RequestError(f"negative_prompt: must be a string, got {_type_name(text)}", key)
        if isinstance(text, str) and model.layout.caption_tokens(text) > limit:
            raise RequestError(f"{key}: {model.layout.caption_tokens(text)} tokens, but this model reads at most "
                               f"{limit} (max_caption_tokens)", key, code="context_length_exceeded")
    n = _int(body, "n", 1, 1, limits.max_n)
    size = body.get("size")
    if size is not None and size != "auto" and size != model_size(model):
        raise RequestError(f"size: {size!r} is not available; this model draws {model_size(model)} images", "size")
    fmt = body.get("response_format")
    if fmt is not None and fmt != "b64_json":
        raise RequestError(f"response_format: {fmt!r} is not available; use b64_json (this server keeps no files "
                           "to link to)", "response_format")
    out = body.get("output_format")
    if out is not None and out != "png":
        raise RequestError(f"output_format: {out!r} is not available; images are PNG", "output_format")
    quality = body.get("quality")
    if quality is not None and quality not in ("auto", "standard"):
        raise RequestError(f"quality: {quality!r} is not available; use standard", "quality")
    scale = _number(body, "guidance_scale", 1.0)
    negative = body.get("negative_prompt")
    if negative is not None and scale == 1.0:
        raise RequestError("negative_prompt: has no effect at guidance_scale 1; give a guidance scale (e.g. 4)",
                           "negative_prompt")
    seed, seeded = _seed(body)
    decoding = {"temperature": _number(body, "temperature", None, 0.0, None),
                "top_k": _int(body, "top_k", None, 1),
                "top_p": _number(body, "top_p", None, 0.0, 1.0, low_open=True)}
    # the model's own T2I defaults apply when the request chose no decoding option, as in generate_images
    options = t2i_sampling_options(model, {k: v for k, v in decoding.items() if v is not None})
    try:
        sampling = Sampling.from_kwargs(**{**options, "seed": seed})
    except TypeError as exc:  # a model config with an unknown default: the server's fault, not the request's
        raise RequestError(f"the model's T2I sampling defaults are unusable: {exc}", None, 500, "server_error")
    return ImageRequest(prompt, n, sampling, scale, negative, seeded)
