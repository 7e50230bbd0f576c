"""A1111-style generation parameters ("parameters" PNG chunk), the text civitai and other tools read.

Written from a workflow (the sampler that made an image, its prompts, seed, size and model) and read
back into a text-to-image workflow when a PNG carries nothing else. Torch-free.
"""

from __future__ import annotations

import copy
import re
from typing import Any

from tui_diffusion.graph.samplers import SAMPLERS, SCHEDULER_SUFFIX
from tui_diffusion.graph.workflow import as_link

SAMPLER_NODES = ("KSampler", "KSamplerAdvanced")
TEXT_INPUTS = {"CLIPTextEncode": "text", "CLIPTextEncodeSDXL": "text_g", "CLIPTextEncodeSDXLRefiner": "text"}


def _upstream(api: dict[str, Any], node_id: str, want: tuple[str, ...], via: tuple[str, ...] | None = None,
              ) -> str | None:
    """The nearest node of a class in ``want`` upstream of ``node_id`` (breadth first), optionally only
    through the named inputs."""
    queue, seen = [node_id], {node_id}
    while queue:
        current = queue.pop(0)
        for name, value in api.get(current, {}).get("inputs", {}).items():
            link = as_link(value)
            if link is None or link.node_id in seen or link.node_id not in api:
                continue
            if via is not None and current == node_id and name not in via:
                continue
            if api[link.node_id]["class_type"] in want:
                return link.node_id
            seen.add(link.node_id)
            queue.append(link.node_id)
    return None


def _text(api: dict[str, Any], sampler: str, name: str) -> str:
    node = _upstream(api, sampler, tuple(TEXT_INPUTS), via=(name,))
    if node is None:
        return ""
    value = api[node]["inputs"].get(TEXT_INPUTS[api[node]["class_type"]], "")
    return value if isinstance(value, str) else ""


def summary(api: dict[str, Any], output_node: str) -> dict[str, Any] | None:
    """What made the image of ``output_node``: prompts, sampler settings, model name."""
    sampler = _upstream(api, output_node, SAMPLER_NODES)
    if sampler is None:
        return None
    noisy = sampler
    while api[noisy]["inputs"].get("add_noise") == "disable":  # a refiner stage: the seed is upstream
        earlier = _upstream(api, noisy, SAMPLER_NODES, via=("latent_image",))
        if earlier is None:
            break
        noisy = earlier
    inputs = api[sampler]["inputs"]
    seed = api[noisy]["inputs"].get("seed", api[noisy]["inputs"].get("noise_seed"))
    loader = _upstream(api, noisy, ("CheckpointLoaderSimple",), via=("model",))
    return {
        "prompt": _text(api, noisy, "positive"),
        "negative": _text(api, noisy, "negative"),
        "steps": inputs.get("steps"),
        "sampler_name": inputs.get("sampler_name"),
        "scheduler": inputs.get("scheduler"),
        "cfg": inputs.get("cfg"),
        "seed": seed if isinstance(seed, int) else None,
        "denoise": inputs.get("denoise"),
        "model": api[loader]["inputs"].get("ckpt_name") if loader else None,
    }


def _fmt(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def parameters_text(info: dict[str, Any], width: int, height: int, model_hash: str | None = None,
                    version: str | None = None) -> str:
    sampler = SAMPLERS.get(info.get("sampler_name") or "")
    label = (sampler.label if sampler else info.get("sampler_name") or "") + SCHEDULER_SUFFIX.get(
        info.get("scheduler") or "", "")
    fields = [("Steps", info.get("steps")), ("Sampler", label), ("CFG scale", info.get("cfg")),
              ("Seed", info.get("seed")), ("Size", f"{width}x{height}")]
    if model_hash:
        fields.append(("Model hash", model_hash[:10]))
    if info.get("model"):
        fields.append(("Model", re.sub(r"\.(safetensors|ckpt|pt)$", "", str(info["model"]).split("/")[-1])))
    if info.get("denoise") not in (None, 1, 1.0):
        fields.append(("Denoising strength", info["denoise"]))
    if version:
        fields.append(("Version", version))
    line = ", ".join(f"{k}: {_fmt(v)}" for k, v in fields if v not in (None, ""))
    text = info.get("prompt") or ""
    if info.get("negative"):
        text += f"\nNegative prompt: {info['negative']}"
    return f"{text}\n{line}"


#: integers as A1111 writes them; bounded, because int() refuses over 4300 digits (and no seed, step
#: count or size needs more than these)
_SEED = re.compile(r"-?[0-9]{1,30}")
_COUNT = re.compile(r"[0-9]{1,9}")
_SIZE = re.compile(r"([0-9]{1,9})x([0-9]{1,9})")


def _is_key_char(ch: str) -> bool:
    return ch.isalnum() or ch in "_ "


def _fields(line: str) -> dict[str, str]:
    """``Key: value, Key: "quoted, value", ...`` in one pass. A hand-written scan because the obvious
    regular expression backtracks cubically on a long run of spaces (a hang on a crafted PNG)."""
    fields: dict[str, str] = {}
    pos, n = 0, len(line)
    quote_scan = (-1, -1)  # where the last quoted value began and where its closing quote is
    while pos < n:
        colon = line.find(":", pos)
        if colon < 0:
            break
        start = colon
        while start > pos and _is_key_char(line[start - 1]):
            start -= 1
        key = line[start:colon].strip()
        value_at = colon + 1
        while value_at < n and line[value_at].isspace():
            value_at += 1
        end = -1
        if value_at < n and line[value_at] == '"':  # a quoted value may hold commas and colons
            if value_at >= quote_scan[1]:  # else: the last scan already found where this one would stop
                i = value_at + 1
                while i < n and line[i] != '"':
                    i += 2 if line[i] == "\\" else 1
                quote_scan = (value_at, i)
            i = quote_scan[1]
            if i < n and (i + 1 == n or line[i + 1] == ","):
                end = i + 1
        if end < 0:
            comma = line.find(",", value_at)
            end = n if comma < 0 else comma
        if key:
            fields[key] = line[value_at:end].strip().strip('"')
        pos = end + 1
    return fields


def parse_parameters(text: str) -> dict[str, Any]:
    """An A1111 "parameters" text: prompt, negative prompt and the key/value line."""
    lines = text.strip().split("\n")
    fields: dict[str, str] = {}
    if lines and re.match(r"^\s*Steps:", lines[-1]):
        fields = _fields(lines.pop())
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    return {"prompt": "\n".join(prompt).strip(), "negative": "\n".join(negative).strip(), "fields": fields}


def _sampler_from_label(label: str) -> tuple[str, str]:
    scheduler = "normal"
    for name, suffix in SCHEDULER_SUFFIX.items():
        if label.endswith(suffix):
            label, scheduler = label[: -len(suffix)], name
    for name, info in SAMPLERS.items():
        if info.label == label:
            return name, scheduler
    return "euler", scheduler


# ComfyUI's default text-to-image graph (the same as workflows/txt2img.json).
_TXT2IMG: dict[str, Any] = {
    "3": {"class_type": "KSampler", "_meta": {"title": "KSampler"}, "inputs": {
        "seed": 0, "steps": 20, "cfg": 8.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0,
        "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0]}},
    "4": {"class_type": "CheckpointLoaderSimple", "_meta": {"title": "Load Checkpoint"},
          "inputs": {"ckpt_name": "model.safetensors"}},
    "5": {"class_type": "EmptyLatentImage", "_meta": {"title": "Empty Latent Image"},
          "inputs": {"width": 512, "height": 512, "batch_size": 1}},
    "6": {"class_type": "CLIPTextEncode", "_meta": {"title": "CLIP Text Encode (Prompt)"},
          "inputs": {"text": "", "clip": ["4", 1]}},
    "7": {"class_type": "CLIPTextEncode", "_meta": {"title": "CLIP Text Encode (Prompt)"},
          "inputs": {"text": "", "clip": ["4", 1]}},
    "8": {"class_type": "VAEDecode", "_meta": {"title": "VAE Decode"},
          "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
    "9": {"class_type": "SaveImage", "_meta": {"title": "Save Image"},
          "inputs": {"filename_prefix": "ComfyUI", "images": ["8", 0]}},
}


def txt2img_from_parameters(text: str) -> dict[str, Any]:
    """A text-to-image workflow that redoes what an A1111 parameters text describes."""
    parsed = parse_parameters(text)
    fields = parsed["fields"]
    api = copy.deepcopy(_TXT2IMG)
    api["6"]["inputs"]["text"] = parsed["prompt"]
    api["7"]["inputs"]["text"] = parsed["negative"]
    sampler = api["3"]["inputs"]
    if _COUNT.fullmatch(fields.get("Steps", "")):
        sampler["steps"] = int(fields["Steps"])
    if _SEED.fullmatch(fields.get("Seed", "")):
        sampler["seed"] = int(fields["Seed"])
    try:
        sampler["cfg"] = float(fields.get("CFG scale", sampler["cfg"]))
    except ValueError:
        pass
    if "Sampler" in fields:
        sampler["sampler_name"], sampler["scheduler"] = _sampler_from_label(fields["Sampler"])
    if fields.get("Schedule type", "").lower() in ("karras", "exponential"):
        sampler["scheduler"] = fields["Schedule type"].lower()
    size = _SIZE.match(fields.get("Size", ""))
    if size:
        api["5"]["inputs"].update(width=int(size.group(1)), height=int(size.group(2)))
    if fields.get("Model"):
        api["4"]["inputs"]["ckpt_name"] = fields["Model"] + ".safetensors"
    return api
