"""SD3/SD3.5 and Flux.1 models from their published files, offline: transformers, text encoders, all-in-one files.

ComfyUI loads these families from separate files (``diffusion_models/``, ``text_encoders/``, ``vae/``) and from
all-in-one checkpoints; both are read here. Each model is built from a config derived from the tensors
(``modelfiles/convert_dit.py``; the shipped full-size configs in ``tui_diffusion/configs/`` give what shapes do
not tell), on the meta device, and its converted weights are assigned without a second copy. Weights stored as
fp16, bf16 or fp8 (e4m3fn, e5m2, and ComfyUI's scaled fp8 with per-layer ``scale_weight``) are read into the
compute dtype. A transformer stays in fp8 in memory, half the bytes of bf16, when ``weight_dtype`` asks for fp8
(its weights rounded through fp8, as ComfyUI's storage does) or when its file holds plain fp8 weights: diffusers'
layerwise casting then upcasts each layer to the compute dtype while it runs, so the numbers are those of the
upcast model. Scaled fp8 files (whose true weights are too small for plain fp8) and layer-by-layer offload
(``--lowvram``'s sequential mode) keep the compute dtype.

The text side is a ``DitClip`` (a ``ClipHandle``): CLIP-L, CLIP-G and T5-XXL as ComfyUI combines them for SD3
and Flux (``encode_prompt`` for CLIPTextEncode; ``encode_sd3``/``encode_flux`` for the family nodes).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from tui_diffusion.modelfiles import convert_dit
from tui_diffusion.modelfiles.header import CheckpointError, TensorInfo, read_header
from tui_diffusion.pipeline.device import Device
from tui_diffusion.pipeline.models import ClipHandle, LoadedCheckpoint, ModelHandle, TextEncoder, load_vae
from tui_diffusion.pipeline.placement import in_use, place
from tui_diffusion.pipeline.prompt_weights import parse_weights, weighted_chunks

CONFIG_PACKAGE = "tui_diffusion.configs"
TEXT_PREFIX = "text_encoders.{}.transformer."
#: the text encoders a type of CLIPLoader/DualCLIPLoader combines, and how their outputs are conditioned
CLIP_KINDS = ("sd3", "flux", "sdxl", "stable_diffusion")
WEIGHT_DTYPES = {"default": None, "fp8_e4m3fn": torch.float8_e4m3fn, "fp8_e4m3fn_fast": torch.float8_e4m3fn,
                 "fp8_e5m2": torch.float8_e5m2}
#: ComfyUI pads SD3's T5 prompt to at least 77 tokens and Flux's to at least 256
T5_MIN_LENGTH = {"sd3": 77, "flux": 256}
CLIP_BOS, CLIP_EOS = 49406, 49407


def quiet_libraries() -> None:
    """diffusers and transformers warn about casts and configs on every load; a worker has no use for it."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def config_dir(name: str) -> Path:
    return Path(str(resources.files(CONFIG_PACKAGE).joinpath(name)))


def t5_tokenizer_dir() -> Path:
    """The shipped T5 tokenizer (see its README for where it came from)."""
    return config_dir("t5_tokenizer")


def _template(rel: str) -> dict[str, Any]:
    return json.loads((config_dir("sd3.5-large") / rel).read_text(encoding="utf-8"))


# -- reading tensors --------------------------------------------------------------------------------------------
class TensorReader:
    """Tensors of one safetensors file by name, cast to a dtype as they are read; ComfyUI's scaled fp8
    (``<layer>.weight`` times ``<layer>.scale_weight``) is undone on the way."""

    def __init__(self, path: Path, header: Mapping[str, TensorInfo] | None = None) -> None:
        from safetensors import safe_open

        self.path = path
        if path.suffix.lower() != ".safetensors":
            raise CheckpointError(f"{path}: only .safetensors files are supported for SD3 and Flux models")
        self.header = dict(header) if header is not None else read_header(path)
        self._file = safe_open(str(path), framework="pt")

    def __contains__(self, name: str) -> bool:
        return name in self.header

    def get(self, name: str, dtype: torch.dtype | None = None, round_to: torch.dtype | None = None) -> torch.Tensor:
        if name not in self.header:
            raise CheckpointError(f"{self.path}: incomplete file: tensor {name!r} is missing")
        t = self._file.get_tensor(name)
        scale = name[: -len(".weight")] + ".scale_weight" if name.endswith(".weight") else None
        if scale is not None and scale in self.header:
            t = t.float() * self._file.get_tensor(scale).float()
        if round_to is not None and t.is_floating_point() and t.ndim >= 2:
            t = t.to(round_to)
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        return t

    def getter(self, dtype: torch.dtype | None, round_to: torch.dtype | None = None) -> Callable[[str], torch.Tensor]:
        return lambda name: self.get(name, dtype, round_to)


def compute_dtype(device: Device) -> torch.dtype:
    """The dtype SD3/Flux transformers and T5 run in: the device's, except fp16 on a GPU with bf16 (Flux and T5
    overflow in fp16)."""
    if device.dtype == torch.float16 and device.torch_device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return device.dtype


def _build(cls: Any, config: Any, state: dict[str, torch.Tensor], what: str, path: Path) -> Any:
    """A model built on the meta device with ``state`` assigned as its weights (every weight must be there)."""
    with torch.device("meta"):
        model = cls(config) if not isinstance(config, dict) else cls.from_config(config)
    expected = set(model.state_dict())
    missing = sorted(expected - set(state))
    if missing:
        raise CheckpointError(f"{path}: not a complete {what}: {len(missing)} tensors missing (e.g. {missing[0]!r})")
    model.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=True, assign=True)
    for name, buf in list(model.named_buffers()):
        if buf.device.type == "meta":  # non-persistent buffers (CLIP's position ids)
            if not name.endswith("position_ids"):
                raise CheckpointError(f"{path}: cannot build the {what}: buffer {name!r} has no value")
            owner = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            owner.register_buffer("position_ids", torch.arange(buf.shape[-1]).expand(1, -1), persistent=False)
    return model.eval().requires_grad_(False)


# -- transformers -----------------------------------------------------------------------------------------------
def transformer_kind(header: Mapping[str, Any]) -> tuple[str, str] | None:
    """("sd3" or "flux", key prefix) of the diffusion transformer in a file; None if it holds neither."""
    for kind, probe in (("sd3", convert_dit.SD3_KEY), ("flux", convert_dit.FLUX_KEY)):
        prefix = convert_dit.model_prefix(header, probe)
        if prefix is not None:
            return kind, prefix
    return None


def load_transformer(reader: TensorReader, device: Device, weight_dtype: str = "default") -> tuple[str, Any]:
    """The SD3 or Flux transformer of a file as diffusers' model, on the device: ("sd3"|"flux", model)."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    quiet_libraries()
    found = transformer_kind(reader.header)
    if found is None:
        raise CheckpointError(f"{reader.path}: no SD3 or Flux diffusion model in this file")
    if weight_dtype not in WEIGHT_DTYPES:
        raise CheckpointError(f"weight_dtype {weight_dtype!r}: expected one of {', '.join(WEIGHT_DTYPES)}")
    kind, prefix = found
    dtype = compute_dtype(device)
    get = reader.getter(dtype, WEIGHT_DTYPES[weight_dtype])
    file = str(reader.path)
    if kind == "sd3":
        config = convert_dit.sd3_config(reader.header, file, prefix)
        state = convert_dit.sd3_to_diffusers({}, config, prefix, get=get)
        cls: Any = SD3Transformer2DModel
    else:
        config = convert_dit.flux_config(reader.header, file, prefix)
        state = convert_dit.flux_to_diffusers({}, config, prefix, get=get)
        cls = FluxTransformer2DModel
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    model = _build(cls, config, state, f"{kind.upper()} transformer", reader.path)
    storage = fp8_storage(reader.header, prefix, weight_dtype, device)
    if storage is None:
        place(model, device, dtype)
    else:  # cast down on the CPU, so the device never holds the full-precision copy
        from diffusers.hooks import apply_layerwise_casting

        model.to(dtype=dtype)
        # every linear layer, the norms' projections too, as ComfyUI's fp8 storage has them (diffusers' default
        # would keep those, a quarter of Flux's weights, in the compute dtype)
        apply_layerwise_casting(model, storage, dtype, skip_modules_pattern=("pos_embed",))
        place(model, device, None)
    if device.compile:  # without inductor's freezing: a LoRA's patches must reach the compiled model's weights
        model.compile()
    return kind, model


def fp8_storage(header: Mapping[str, Any], prefix: str, weight_dtype: str, device: Device) -> torch.dtype | None:
    """The fp8 dtype a transformer is kept in between layer calls, or None to keep the compute dtype: fp8 when
    ``weight_dtype`` asks for it, or when most of the file's matrices are plain (unscaled) fp8 (ComfyUI also
    keeps a model in the dtype most of its weights have)."""
    if device.offload == "sequential":  # accelerate's per-layer hooks move weights as they are; not both
        return None
    if WEIGHT_DTYPES.get(weight_dtype) is not None:
        return WEIGHT_DTYPES[weight_dtype]
    stored = [info.dtype for name, info in header.items()
              if name.startswith(prefix) and isinstance(info, TensorInfo) and len(info.shape) >= 2]
    if not stored or any(name.endswith(".scale_weight") for name in header):
        return None
    kinds = {"F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
    most = max(set(stored), key=stored.count)
    return kinds.get(most) if stored.count(most) * 2 > len(stored) else None


def model_handle(kind: str, transformer: Any, device: Device, source: str) -> ModelHandle:
    from tui_diffusion.families import by_id

    return ModelHandle(transformer, {}, by_id(kind), device, source)


# -- text encoders ----------------------------------------------------------------------------------------------
def _strip(header: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    return {k[len(prefix):]: v for k, v in header.items() if k.startswith(prefix)}


def text_encoder_role(header: Mapping[str, Any]) -> str | None:
    """"t5xxl", "clip_l" or "clip_g" from a text encoder's tensors (keys without prefix); CLIP-G is told by its
    depth or width (ComfyUI: a 31st layer; bigG is 1280 wide); a pair of CLIPs is resolved by ``assign_roles``."""
    if "shared.weight" in header or "encoder.block.0.layer.0.SelfAttention.q.weight" in header:
        return "t5xxl"
    if "text_model.embeddings.token_embedding.weight" not in header:
        return None
    width = _width(header)
    if "text_model.encoder.layers.30.mlp.fc1.weight" in header or (width is not None and width >= 1280):
        return "clip_g"
    return "clip_l"


def _width(header: Mapping[str, Any]) -> int | None:
    info = header.get("text_model.embeddings.token_embedding.weight")
    return info.shape[1] if isinstance(info, TensorInfo) else None


def assign_roles(headers: list[Mapping[str, Any]], names: list[str]) -> list[str]:
    """The role of each text encoder file; of two CLIPs read as the same kind, the wider is CLIP-G (small test
    encoders keep that convention)."""
    roles = []
    for header, name in zip(headers, names, strict=True):
        role = text_encoder_role(header)
        if role is None:
            raise CheckpointError(f"{name}: not a CLIP or T5 text encoder (no 'text_model.*' or T5 tensors)")
        roles.append(role)
    clips = [i for i, r in enumerate(roles) if r.startswith("clip")]
    if len(clips) == 2 and roles[clips[0]] == roles[clips[1]]:
        a, b = clips
        wider, narrower = (a, b) if (_width(headers[a]) or 0) > (_width(headers[b]) or 0) else (b, a)
        roles[wider], roles[narrower] = "clip_g", "clip_l"
    return roles


def load_clip_model(reader: TensorReader, prefix: str, role: str, dtype: torch.dtype) -> Any:
    """CLIP-L as ``CLIPTextModel`` (SD3 and Flux read its unprojected pooled output) or CLIP-G as
    ``CLIPTextModelWithProjection``, from Hugging Face keys (``text_model.*``) under ``prefix``."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    h = _strip(reader.header, prefix)
    template = _template("text_encoder_2/config.json" if role == "clip_g" else "text_encoder/config.json")
    tokens = h["text_model.embeddings.token_embedding.weight"].shape
    hidden = tokens[1]
    fc1 = h.get("text_model.encoder.layers.0.mlp.fc1.weight")
    if fc1 is None:
        raise CheckpointError(f"{reader.path}: incomplete text encoder {role}: no layers")
    layers = len({k.split(".")[3] for k in h if k.startswith("text_model.encoder.layers.")})
    template.pop("architectures", None)
    config = CLIPTextConfig(**{**template, "vocab_size": tokens[0], "hidden_size": hidden,
                               "intermediate_size": fc1.shape[0], "num_hidden_layers": layers,
                               "num_attention_heads": max(1, hidden // 64),
                               "max_position_embeddings": h["text_model.embeddings.position_embedding.weight"].shape[0],
                               "projection_dim": h["text_projection.weight"].shape[0] if "text_projection.weight" in h
                               else hidden})
    cls = CLIPTextModelWithProjection if role == "clip_g" else CLIPTextModel
    if role == "clip_g" and "text_projection.weight" not in h:
        raise CheckpointError(f"{reader.path}: CLIP-G without its text projection ('text_projection.weight')")
    with torch.device("meta"):
        wrapped = any(k.startswith("text_model.") for k in cls(config).state_dict())
    state = {}
    for key in h:
        if not key.startswith(("text_model.", "text_projection.")) or key.endswith("position_ids"):
            continue
        if key.startswith("text_projection.") and role != "clip_g":
            continue
        name = key if wrapped or not key.startswith("text_model.") else key[len("text_model."):]
        state[name] = reader.get(prefix + key, dtype)
    return _build(cls, config, state, f"{role} text encoder", reader.path)


def load_t5_model(reader: TensorReader, prefix: str, dtype: torch.dtype) -> Any:
    """T5's encoder (``T5EncoderModel``) from its published keys (``shared.weight``, ``encoder.block.N...``)."""
    from transformers import T5Config, T5EncoderModel

    h = _strip(reader.header, prefix)
    embed = "shared.weight" if "shared.weight" in h else "encoder.embed_tokens.weight"
    if embed not in h:
        raise CheckpointError(f"{reader.path}: incomplete T5 encoder: no token embedding ('shared.weight')")
    vocab, width = h[embed].shape
    rel = h.get("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
    q = h.get("encoder.block.0.layer.0.SelfAttention.q.weight")
    ff = "encoder.block.0.layer.1.DenseReluDense."
    wi = h.get(ff + "wi_0.weight") or h.get(ff + "wi.weight")
    if rel is None or q is None or wi is None:
        raise CheckpointError(f"{reader.path}: incomplete T5 encoder (its first block is missing)")
    heads = rel.shape[1]
    template = _template("text_encoder_3/config.json")
    template.pop("architectures", None)
    gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in h
    config = T5Config(**{**template, "vocab_size": vocab, "d_model": width, "num_heads": heads,
                         "d_kv": q.shape[0] // heads, "d_ff": wi.shape[0],
                         "num_layers": len({k.split(".")[2] for k in h if k.startswith("encoder.block.")}),
                         "relative_attention_num_buckets": rel.shape[0],
                         "feed_forward_proj": "gated-gelu" if gated else "relu"})
    state = {k: reader.get(prefix + k, dtype) for k in h if k.startswith("encoder.")}
    shared = reader.get(prefix + embed, dtype)
    state["shared.weight"] = state["encoder.embed_tokens.weight"] = shared
    return _build(T5EncoderModel, config, state, "T5 text encoder", reader.path)


@functools.lru_cache(maxsize=1)
def clip_tokenizer() -> Any:
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(config_dir("clip_tokenizer")), model_max_length=77)


@functools.lru_cache(maxsize=1)
def t5_tokenizer() -> Any:
    from transformers import T5TokenizerFast

    return T5TokenizerFast.from_pretrained(str(t5_tokenizer_dir()))


@dataclass
class T5Encoder:
    tokenizer: Any
    model: Any


@dataclass
class DitClip(ClipHandle):
    """CLIP for SD3 (CLIP-L, CLIP-G, T5; any may be absent, as in ComfyUI) or Flux (CLIP-L and T5).

    ``encoders`` holds the CLIPs (so code written for CLIPs sees them); ``kind`` says how outputs combine.
    CLIPTextEncode must hand such a CLIP's prompt to ``encode_prompt`` (the contract with ``pipeline/nodes.py``):
    the CLIP-only encoding of the SD families would leave T5 out. Textual-inversion embeddings are not read here.
    """

    kind: str = "sd3"
    clip_l: TextEncoder | None = None
    clip_g: TextEncoder | None = None
    t5: T5Encoder | None = None

    def parts(self) -> dict[str, Any]:
        named = {"clip_l": self.clip_l, "clip_g": self.clip_g}
        out = {name: enc.model for name, enc in named.items() if enc is not None}
        if self.t5 is not None:
            out["t5xxl"] = self.t5.model
        return out

    def encode_prompt(self, text: str) -> tuple[torch.Tensor, torch.Tensor]:
        """CLIPTextEncode: the same text to every encoder; (context, pooled)."""
        if self.kind == "flux":
            return self.encode_flux(text, text)
        return self.encode_sd3(text, text, text)

    def encode_sd3(self, text_l: str, text_g: str, text_t5: str,
                   empty_padding: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """SD3's conditioning as ComfyUI builds it: CLIP-L and CLIP-G's penultimate hidden states side by side,
        zero-padded to T5's width, then T5's tokens; pooled: both CLIPs' pooled outputs side by side. Without
        ``empty_padding`` an empty text leaves its encoder out."""
        with in_use(*self.parts().values()):
            return self._encode_sd3(text_l, text_g, text_t5, empty_padding)

    @torch.inference_mode()
    def _encode_sd3(self, text_l: str, text_g: str, text_t5: str,
                    empty_padding: bool) -> tuple[torch.Tensor, torch.Tensor]:
        use_l = self.clip_l is not None and (empty_padding or bool(text_l))
        use_g = self.clip_g is not None and (empty_padding or bool(text_g))
        windows = 0
        if use_l or use_g:
            windows = max(len(_clip_chunks(text_l)) if use_l else 0, len(_clip_chunks(text_g)) if use_g else 0)
        lg = pooled_l = pooled_g = None
        if use_l:
            lg, pooled_l = _encode_clip(self.clip_l, text_l, -2, CLIP_EOS, self.device, windows)
        if use_g:
            hidden_g, pooled_g = _encode_clip(self.clip_g, text_g, -2, 0, self.device, windows)
            lg = torch.cat([lg, hidden_g], dim=-1) if lg is not None else torch.nn.functional.pad(
                hidden_g, (self._width(self.clip_l, 768), 0))
        elif lg is not None:
            lg = torch.nn.functional.pad(lg, (0, self._width(self.clip_g, 1280)))
        pooled = torch.cat([
            pooled_l if pooled_l is not None else torch.zeros(1, self._width(self.clip_l, 768)),
            pooled_g if pooled_g is not None else torch.zeros(1, self._width(self.clip_g, 1280), dtype=torch.float32),
        ], dim=-1)
        out = lg
        if self.t5 is not None and (empty_padding or bool(text_t5)):
            t5_out = _encode_t5(self.t5, text_t5, T5_MIN_LENGTH["sd3"], self.device)
            if lg is not None:
                width = t5_out.shape[-1]
                if lg.shape[-1] > width:
                    raise CheckpointError(f"the CLIP outputs ({lg.shape[-1]} wide) do not fit T5's width {width}")
                out = torch.cat([torch.nn.functional.pad(lg, (0, width - lg.shape[-1])), t5_out], dim=-2)
            else:
                out = t5_out
        if out is None:
            width = self.t5.model.config.d_model if self.t5 is not None else 4096
            out = torch.zeros(1, 77, width)
        return out, pooled

    def encode_flux(self, text_l: str, text_t5: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Flux's conditioning: T5's hidden states (at least 256 tokens) and CLIP-L's pooled output."""
        if self.t5 is None or self.clip_l is None:
            raise CheckpointError("Flux needs both CLIP-L and T5-XXL text encoders (DualCLIPLoader, type flux)")
        with in_use(*self.parts().values()), torch.inference_mode():
            _, pooled = _encode_clip(self.clip_l, text_l, -1, CLIP_EOS, self.device)
            return _encode_t5(self.t5, text_t5, T5_MIN_LENGTH["flux"], self.device), pooled

    @staticmethod
    def _width(enc: TextEncoder | None, default: int) -> int:
        return int(enc.model.config.hidden_size) if enc is not None else default


def _clip_chunks(text: str) -> list:
    """A prompt's 77-token windows (for their count: CLIP-L and CLIP-G must give the same number)."""
    tok = clip_tokenizer()
    return weighted_chunks(text, lambda w: tok(w, add_special_tokens=False).input_ids, CLIP_BOS, CLIP_EOS, CLIP_EOS)


def _encode_clip(enc: TextEncoder, text: str, layer: int, pad: int, device: Device,
                 min_windows: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """One CLIP as ComfyUI runs it: weighted tokens in 77-token windows (``pad`` after the end token: CLIP-L pads
    with the end token, CLIP-G with 0), the hidden states of ``layer`` (-2: the penultimate, raw), and the pooled
    output of the first window (projected when the model has a projection)."""
    tok = enc.tokenizer
    chunks = weighted_chunks(text, lambda w: tok(w, add_special_tokens=False).input_ids, CLIP_BOS, CLIP_EOS, pad)
    empty = [(CLIP_BOS, 1.0), (CLIP_EOS, 1.0)] + [(pad, 1.0)] * 75
    while len(chunks) < min_windows:
        chunks.append(list(empty))
    weights = torch.tensor([[w for _, w in c] for c in chunks], dtype=torch.float32)
    rows = [[t for t, _ in c] for c in chunks]
    weighted = bool((weights != 1.0).any())
    if weighted:
        rows.append([t for t, _ in empty])
    ids = torch.tensor(rows, dtype=torch.long, device=device.torch_device)
    out = enc.model(ids, output_hidden_states=True)
    hidden = (out.last_hidden_state if layer == -1 else out.hidden_states[layer]).float().cpu()
    pooled = getattr(out, "text_embeds", None)
    pooled = (pooled if pooled is not None else out.pooler_output)[:1].float().cpu()
    if weighted:
        z_empty, hidden = hidden[-1:], hidden[:-1]
        hidden = z_empty + weights[..., None] * (hidden - z_empty)
    return hidden.reshape(1, -1, hidden.shape[-1]), pooled


def t5_tokens(tokenizer: Any, text: str, min_length: int) -> list[tuple[int, float]]:
    """T5's weighted tokens as ComfyUI makes them: word by word, no start token, the end token (1), then
    padding (0) up to ``min_length``; never cut into windows."""
    tokens: list[tuple[int, float]] = []
    for segment, weight in parse_weights(text):
        for word in segment.replace("\n", " ").split(" "):
            if word:
                tokens += [(t, weight) for t in tokenizer(word, add_special_tokens=False).input_ids]
    tokens.append((1, 1.0))
    tokens += [(0, 1.0)] * (min_length - len(tokens))
    return tokens


def _encode_t5(t5: T5Encoder, text: str, min_length: int, device: Device) -> torch.Tensor:
    tokens = t5_tokens(t5.tokenizer, text, min_length)
    weights = torch.tensor([[w for _, w in tokens]], dtype=torch.float32)
    rows = [[t for t, _ in tokens]]
    weighted = bool((weights != 1.0).any())
    if weighted:
        rows.append([1] + [0] * (len(tokens) - 1))
    ids = torch.tensor(rows, dtype=torch.long, device=device.torch_device)
    hidden = t5.model(ids).last_hidden_state.float().cpu()
    if weighted:
        z_empty, hidden = hidden[-1:], hidden[:-1]
        hidden = z_empty + weights[..., None] * (hidden - z_empty)
    return hidden


def make_clip(kind: str, models: Mapping[str, Any], device: Device) -> ClipHandle:
    """The CLIP handle of a loader type from loaded text encoders by role (clip_l, clip_g, t5xxl)."""
    from tui_diffusion.pipeline.errors import NodeError

    def clip(role: str) -> TextEncoder | None:
        if role not in models:
            return None
        return TextEncoder(clip_tokenizer(), models[role], norm_hidden=kind == "stable_diffusion",
                           pooled=role == "clip_g")

    if kind == "stable_diffusion":
        if set(models) != {"clip_l"}:
            raise NodeError("type stable_diffusion takes one CLIP-L text encoder")
        return ClipHandle([clip("clip_l")], device, layer=-1)
    if kind == "sdxl":
        if set(models) != {"clip_l", "clip_g"}:
            raise NodeError(f"type sdxl takes CLIP-L and CLIP-G text encoders (got {', '.join(sorted(models))})")
        return ClipHandle([clip("clip_l"), clip("clip_g")], device, layer=-2)
    if kind == "flux" and set(models) != {"clip_l", "t5xxl"}:
        raise NodeError(f"type flux takes CLIP-L and T5-XXL text encoders (got {', '.join(sorted(models))})")
    if kind not in ("sd3", "flux"):
        raise NodeError(f"CLIP type {kind!r} is not supported; supported: {', '.join(CLIP_KINDS)}")
    t5 = T5Encoder(t5_tokenizer(), models["t5xxl"]) if "t5xxl" in models else None
    clips = [c for c in (clip("clip_l"), clip("clip_g")) if c is not None]
    return DitClip(clips, device, layer=-2, kind=kind, clip_l=clip("clip_l"), clip_g=clip("clip_g"), t5=t5)


def load_text_encoders(paths: Iterable[Path], kind: str, device: Device) -> ClipHandle:
    """CLIPLoader/DualCLIPLoader/TripleCLIPLoader: text encoder files (ComfyUI's ``text_encoders/``) -> CLIP."""
    from tui_diffusion.pipeline.errors import NodeError

    quiet_libraries()
    readers = [TensorReader(Path(p)) for p in paths]
    roles = assign_roles([r.header for r in readers], [str(r.path) for r in readers])
    if len(set(roles)) != len(roles):
        raise NodeError(f"two text encoders of the same kind ({', '.join(roles)}): give different ones")
    dtype = compute_dtype(device)
    models = {}
    for reader, role in zip(readers, roles, strict=True):
        if role == "t5xxl":
            models[role] = load_t5_model(reader, "", dtype)
        else:
            models[role] = load_clip_model(reader, "", role, device.dtype if kind != "sd3" else dtype)
    clip = make_clip(kind, models, device)
    for module in clip.parts().values():
        place(module, device, next(module.parameters()).dtype)
    return clip


# -- all-in-one checkpoints -------------------------------------------------------------------------------------
def load_dit_checkpoint(path: Path, header: Mapping[str, TensorInfo], device: Device,
                        config_cache: Path) -> LoadedCheckpoint:
    """An all-in-one SD3.5 or Flux checkpoint (transformer, VAE and text encoders in one file)."""
    reader = TensorReader(path, header)
    found = transformer_kind(header)
    if found is None:
        raise CheckpointError(f"{path}: no SD3 or Flux diffusion model in this file")
    kind, _ = found
    roles = [r for r in ("clip_l", "clip_g", "t5xxl") if any(k.startswith(TEXT_PREFIX.format(r)) for k in header)]
    has_vae = any(k.startswith(("first_stage_model.", "vae.")) for k in header)
    if not roles or not has_vae:
        missing = " and ".join(x for x, ok in (("text encoders", bool(roles)), ("VAE", has_vae)) if not ok)
        raise CheckpointError(f"{path}: this file holds the {kind.upper()} diffusion model without its {missing}: "
                              "load it with UNETLoader (Load Diffusion Model) from diffusion_models/, with its text "
                              "encoders (DualCLIPLoader/TripleCLIPLoader) and VAE (VAELoader)")
    _, transformer = load_transformer(reader, device)
    dtype = compute_dtype(device)
    models = {}
    for role in roles:
        prefix = TEXT_PREFIX.format(role)
        models[role] = (load_t5_model(reader, prefix, dtype) if role == "t5xxl"
                        else load_clip_model(reader, prefix, role, dtype))
    clip = make_clip(kind, models, device)
    for module in clip.parts().values():
        place(module, device, dtype)
    vae = load_vae(path, device, config_cache)
    return LoadedCheckpoint(model=model_handle(kind, transformer, device, str(path)), clip=clip, vae=vae)
