"""LoRA naming conventions shared by several families (each family lists the ones it answers to).

A convention spells one component's modules of one module space; see ``spec.Convention``. The
names say who writes them: kohya sd-scripts / musubi-tuner (``lora_unet_`` + flattened names),
ComfyUI (``diffusion_model.`` + native names), diffusers / PEFT (``transformer.`` / ``unet.`` +
diffusers names, alpha in ``lora_adapter_metadata``), LyCORIS / SimpleTuner (``lycoris_`` +
flattened diffusers names), OneTrainer (``lora_transformer_``), and bare names (BFL, DiffSynth).
"""

from __future__ import annotations

from .spec import Convention

KOHYA_NATIVE = Convention("kohya", "denoiser", "lora_unet_", "_", "native")
COMFY = Convention("comfy", "denoiser", "diffusion_model.", ".", "native")
PEFT_TRANSFORMER = Convention("peft", "denoiser", "transformer.", ".", "diffusers", roles="peft", alpha="metadata")
PEFT_BASE_MODEL = Convention("peft-base-model", "denoiser", "base_model.model.", ".", "diffusers", roles="peft",
                             alpha="metadata")
LYCORIS_DIFFUSERS = Convention("lycoris", "denoiser", "lycoris_", "_", "diffusers")
ONETRAINER = Convention("onetrainer", "denoiser", "lora_transformer_", "_", "diffusers")


def bare(name: str, roots: tuple[str, ...], space: str = "native") -> Convention:
    """Module names without any prefix (BFL's own files, DiffSynth), told apart by their roots."""
    return Convention(name, "denoiser", "", ".", space, roots=roots)
