"""CheckpointSave: a MODEL, CLIP and VAE written as one single-file checkpoint in the layout of the model's family.

The family says how its models are written (``Family.checkpoint_state``, ``vae_prefix``, ``modelspec_architecture``),
as ComfyUI's ``supported_models`` do for its ``save_checkpoint``:

- SD1.x, SD2.x, SDXL: the original (LDM/SGM) layout that ``checkpoint_writer`` writes and the loaders read
  (``model.diffusion_model.*``, ``cond_stage_model.*`` or ``conditioner.embedders.*``, ``first_stage_model.*``);
- SD3/SD3.5 and Flux.1: ComfyUI's all-in-one layout, the transformer's original keys (Stability's MMDiT, Black
  Forest Labs') under ``model.diffusion_model.``, the text encoders under
  ``text_encoders.<clip_l|clip_g|t5xxl>.transformer.`` (Hugging Face keys), the VAE in the LDM layout under
  ``first_stage_model.`` (SD3) or ``vae.`` (Flux). A Flux model from UNETLoader, DualCLIPLoader and VAELoader
  becomes one file, as in ComfyUI.

Patches (merges, LoRAs) are applied while the weights are read, as ComfyUI bakes them in. Tensors keep the dtype
they have in memory, as ComfyUI's do: a transformer kept in fp8 (a plain fp8 file, or UNETLoader's fp8
``weight_dtype``) is written in fp8 and loads back as the same fp8 model; one read from ComfyUI's scaled fp8 files
was dequantised on loading, so it is written as the weights it runs with (the compute dtype), which both programs
load as the same model (ComfyUI would keep its scaled fp8 storage, which this program does not hold). The metadata
follows ComfyUI's ``save_checkpoint``: the modelspec keys it writes (SDXL, SD3), the prediction type, the workflow
(``prompt`` and ``workflow``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from tui_diffusion.paths import PathError
from tui_diffusion.pipeline.checkpoint_writer import _hf_text_keys, openclip_from_hf, unet_to_original
from tui_diffusion.pipeline.checkpoint_writer_dit import SD3_MODEL, text_encoder_keys, vae_state_to_original
from tui_diffusion.pipeline.errors import NodeError
from tui_diffusion.pipeline.lora import patched
from tui_diffusion.pipeline.models import ClipHandle, ModelHandle, VaeHandle
from tui_diffusion.pipeline.placement import in_use
from tui_diffusion.store.outputs import split_prefix

if TYPE_CHECKING:
    from tui_diffusion.families.sd3 import DiTFamily

SUFFIX = ".safetensors"


def _cpu_tensor(value: torch.Tensor, what: str) -> torch.Tensor:
    """A copy on the CPU (the patched weights are restored when the context ends), contiguous for safetensors."""
    if value.device.type == "meta":
        raise NodeError(f"CheckpointSave cannot read the {what}'s weights with --novram (layer-by-layer "
                        "offload); use --lowvram")
    return value.detach().to("cpu", copy=True).contiguous()


def _cpu_copy(state: dict[str, torch.Tensor], what: str) -> dict[str, torch.Tensor]:
    return {key: _cpu_tensor(value, what) for key, value in state.items()}


class _CopiedOnRead(dict):
    """A state dict whose tensors are copied to the CPU as a key conversion reads them, so that a fused layer
    (``qkv``) is concatenated from copies freed right after: the converted checkpoint is the only full copy in
    memory (a 12B Flux transformer is 24 GB in bf16), and nothing is concatenated beside the model on the device."""

    def __init__(self, state: dict[str, torch.Tensor], what: str) -> None:
        super().__init__(state)
        self.what = what

    def __getitem__(self, key: str) -> torch.Tensor:
        return _cpu_tensor(super().__getitem__(key), self.what)


def _converted_copy(state: dict[str, torch.Tensor], convert: Any, what: str) -> dict[str, torch.Tensor]:
    """``convert(state)`` with every tensor of the result a CPU copy (one still sharing a live tensor's memory,
    read past ``_CopiedOnRead``, is copied too)."""
    live = {value.data_ptr() for value in state.values() if value.device.type != "meta"}
    out = convert(_CopiedOnRead(state, what))
    return {key: _cpu_tensor(value, what) if value.device.type != "cpu" or value.data_ptr() in live else value
            for key, value in out.items()}


# -- SD1.x, SD2.x, SDXL ---------------------------------------------------------------------------------------
def _text_state(model: ModelHandle, clip: ClipHandle, prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    if len(prefixes) != len(clip.encoders):
        raise NodeError(f"clip: a CLIP with {len(clip.encoders)} text encoder(s), but a {model.family.label} "
                        f"checkpoint holds {len(prefixes)}: connect the CLIP of the same model family")
    out: dict[str, torch.Tensor] = {}
    with in_use(*clip.parts().values()), patched(clip.parts(), list(clip.patches)):
        for prefix, encoder in zip(prefixes, clip.encoders, strict=True):
            if prefix.endswith(".transformer."):  # CLIP-L in the Hugging Face layout
                for key, value in _hf_text_keys(encoder.model).items():
                    out[prefix + key] = value
                positions = encoder.model.config.max_position_embeddings
                out.setdefault(prefix + "text_model.embeddings.position_ids",
                               torch.arange(positions, dtype=torch.int64)[None])
            else:  # OpenCLIP's layout (SD2's ViT-H, SDXL's bigG)
                out.update(openclip_from_hf(encoder.model, prefix))
        return _cpu_copy(out, "CLIP")


def unet_checkpoint_state(model: ModelHandle, clip: ClipHandle, text_prefixes: tuple[str, ...]) -> dict[str, Any]:
    """A UNet family's network and text encoders in the LDM/SGM layout (``UNetFamily.checkpoint_state``)."""
    unet = model.unet
    layers = getattr(getattr(unet, "config", None), "layers_per_block", None)
    if not isinstance(layers, int):
        raise NodeError(f"model: this {model.family.label} model's network is not a UNet CheckpointSave can write")
    with in_use(unet), patched({"unet": unet}, list(model.patches)):
        state = _cpu_copy(unet_to_original(unet.state_dict(), layers), "model")
    state.update(_text_state(model, clip, text_prefixes))
    return state


# -- SD3/SD3.5, Flux.1 ----------------------------------------------------------------------------------------
def _dit_text_encoders(model: ModelHandle, clip: ClipHandle) -> dict[str, torch.nn.Module]:
    """The CLIP's text encoders by role, checked against what a checkpoint of the model's family holds."""
    from tui_diffusion.pipeline.models_dit import DitClip

    family = model.family
    holds = ", ".join(family.text_encoders)
    if not isinstance(clip, DitClip):
        raise NodeError(f"clip: a CLIP of the SD1.x/SD2.x/SDXL kind, but a {family.label} checkpoint holds "
                        f"{holds}: connect this model's CLIP (its checkpoint loader's, or DualCLIPLoader/"
                        "TripleCLIPLoader)")
    parts = clip.parts()
    extra = [role for role in parts if role not in family.text_encoders]
    missing = [role for role in getattr(family, "required_text_encoders", ()) if role not in parts]
    if extra or missing or not parts:
        found = ", ".join(parts) or "no text encoder"
        raise NodeError(f"clip: a CLIP with {found}, but a {family.label} checkpoint holds {holds}"
                        f"{' (all of them)' if missing else ''}: connect this model's text encoders")
    t5 = parts.get("t5xxl")
    width = getattr(model.unet.config, "joint_attention_dim", None)
    if t5 is not None and width is not None and int(t5.config.d_model) != int(width):
        raise NodeError(f"clip: its T5 is {t5.config.d_model} wide, but this {family.label} model reads a context "
                        f"{width} wide: connect this model's text encoders")
    return {role: parts[role] for role in family.text_encoders if role in parts}


def dit_checkpoint_state(model: ModelHandle, clip: ClipHandle, family: DiTFamily) -> dict[str, Any]:
    """An SD3 or Flux transformer and its text encoders in ComfyUI's all-in-one layout
    (``DiTFamily.checkpoint_state``); the family converts the transformer's keys (``original_keys``)."""
    encoders = _dit_text_encoders(model, clip)
    net = model.unet
    with in_use(net), patched({"unet": net}, list(model.patches)):
        state = _converted_copy(net.state_dict(), lambda s: family.original_keys(s, net.config, SD3_MODEL),
                                "model")
    with in_use(*encoders.values()), patched(clip.parts(), list(clip.patches)):
        state.update(_cpu_copy(text_encoder_keys(encoders, tuple(encoders)), "CLIP"))
    return state


# -- the file -------------------------------------------------------------------------------------------------
def checkpoint_state(model: ModelHandle, clip: ClipHandle, vae: VaeHandle) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint, by the names the model's family gives them, with the model's and the
    CLIP's patches applied. NodeError names the input that cannot be written."""
    family = model.family
    channels = family.latent_format.channels
    if vae.latent_channels != channels:
        raise NodeError(f"vae: a VAE with {vae.latent_channels} latent channels, but a {family.label} model works "
                        f"in {channels}: connect this model's VAE")
    state = family.checkpoint_state(model, clip)
    with in_use(vae.vae):
        vae_sd = _cpu_copy(vae.vae.state_dict(), "VAE")
    state.update(vae_state_to_original(vae_sd, len(vae.vae.config.block_out_channels), family.vae_prefix))
    return state


def checkpoint_metadata(model: ModelHandle, title: str, prompt: dict[str, Any] | None,
                        workflow: dict[str, Any] | None) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """ComfyUI's metadata for a saved checkpoint, and the marker tensors it adds (``v_pred``, ``ztsnr``)."""
    from tui_diffusion.pipeline.model_sampling import DiscreteSampling, EDMSampling

    metadata: dict[str, str] = {}
    extra: dict[str, torch.Tensor] = {}
    architecture = model.family.modelspec_architecture
    if architecture is not None:
        metadata.update({"modelspec.architecture": architecture, "modelspec.sai_model_spec": "1.0.0",
                         "modelspec.implementation": "sgm", "modelspec.title": title})
    sampling = model.model_sampling
    if isinstance(sampling, DiscreteSampling):
        if sampling.prediction == "eps":
            metadata["modelspec.predict_key"] = "epsilon"
        elif sampling.prediction == "v":
            metadata["modelspec.predict_key"] = "v"
            extra["v_pred"] = torch.tensor([])
            if float(sampling.alphas_cumprod[-1]) < 1e-6:  # rescaled to zero terminal SNR
                extra["ztsnr"] = torch.tensor([])
    elif isinstance(sampling, EDMSampling) and sampling.prediction == "v":  # CosXL, as ComfyUI writes it
        extra["edm_vpred.sigma_max"] = torch.tensor(sampling.sigma_max).float()
        extra["edm_vpred.sigma_min"] = torch.tensor(sampling.sigma_min).float()
    metadata["prompt"] = json.dumps(prompt) if prompt is not None else ""
    if workflow is not None:
        metadata["workflow"] = json.dumps(workflow)
    return metadata, extra


def next_counter(folder: Path, stem: str) -> int:
    """One past the highest counter of ``<stem>_NNNNN_.safetensors`` files in the folder."""
    head, tail = f"{stem}_", f"_{SUFFIX}"
    found = [int(n[len(head):-len(tail)]) for n in os.listdir(folder)
             if n.startswith(head) and n.endswith(tail) and n[len(head):-len(tail)].isdigit()] \
        if folder.is_dir() else []
    return max(found, default=0) + 1


def write_checkpoint(state: dict[str, torch.Tensor], output_dir: Path, filename_prefix: str,
                     metadata_for: Any) -> Path:
    """Write ``<prefix>_<counter:05>_.safetensors`` under the output folder: under a temporary name first, then
    linked to the first free counter, so there is never a partial file under the final name and nothing is
    overwritten. ``metadata_for(stem, counter)`` gives the metadata (its title names the counter)."""
    from safetensors.torch import save_file

    folder, stem = split_prefix(output_dir, filename_prefix)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{stem}.{os.getpid()}.tmp{SUFFIX}"
    try:
        counter = next_counter(folder, stem)
        while True:
            save_file(state, str(tmp), metadata=metadata_for(stem, counter))
            final = folder / f"{stem}_{counter:05}_{SUFFIX}"
            try:
                os.link(tmp, final)
                return final
            except FileExistsError:  # another writer took this counter meanwhile: the next free one
                counter = next_counter(folder, stem)
            except OSError:  # file systems without hard links
                if final.exists():
                    counter = next_counter(folder, stem)
                    continue
                os.rename(tmp, final)
                return final
    finally:
        tmp.unlink(missing_ok=True)


def save_checkpoint(model: ModelHandle, clip: ClipHandle, vae: VaeHandle, output_dir: Path, filename_prefix: str,
                    prompt: dict[str, Any] | None = None, workflow: dict[str, Any] | None = None) -> Path:
    """CheckpointSave's work; NodeError names the input or the folder when it cannot be done."""
    state = checkpoint_state(model, clip, vae)

    def metadata_for(stem: str, counter: int) -> dict[str, str]:
        return checkpoint_metadata(model, f"{stem} {counter}", prompt, workflow)[0]

    state.update(checkpoint_metadata(model, "", None, None)[1])
    try:
        return write_checkpoint(state, output_dir, filename_prefix, metadata_for)
    except PathError as exc:
        raise NodeError(f"filename_prefix: {exc}") from None
    except OSError as exc:  # a full disk, a read-only folder: the job fails, no partial file is left
        raise NodeError(f"cannot write the checkpoint into {output_dir}: {exc.strerror or exc}") from None
