"""Chroma (Chroma1-HD / -Base / -Flash): Flux.1-schnell's BFL layout without the per-block
modulations (``img_mod``, ``txt_mod``, ``modulation``), ``time_in`` and ``vector_in``, which a
``distilled_guidance_layer`` (an MLP that computes all the modulations) replaces. Flux.1's tables
apply to the modules Chroma has; diffusers' ChromaTransformer2DModel adds the approximator's names.
"""

from __future__ import annotations

from ..keys import count
from . import conventions as C
from . import flux
from .modules import Row, Table, View, expand, native_space
from .spec import DENOISER, Family, Shapes, Signature, Slot, Target, vae_slot
from .text import t5_slot

# diffusers ChromaTransformer2DModel (convert_chroma_transformer_checkpoint_to_diffusers): Flux.1's
# rows (those whose modules Chroma lacks match nothing) and the approximator
DIFFUSERS = Table("diffusers", flux.DIFFUSERS.rows + (
    Row("distilled_guidance_layer.in_proj", "distilled_guidance_layer.in_proj"),
    Row("distilled_guidance_layer.out_proj", "distilled_guidance_layer.out_proj"),
    Row("distilled_guidance_layer.layers.{i}.linear_1", "distilled_guidance_layer.layers.{i}.in_layer"),
    Row("distilled_guidance_layer.layers.{i}.linear_2", "distilled_guidance_layer.layers.{i}.out_layer"),
    Row("distilled_guidance_layer.norms.{i}", "distilled_guidance_layer.norms.{i}", leaf="scale"),
))
TABLES = (DIFFUSERS, flux.LINEAR1_QKV)
CONVENTIONS = tuple(c for c in flux.CONVENTIONS if c.space != "xlabs" and c.name != "bfl") + (
    C.bare("bfl", flux.BFL_ROOTS + ("distilled_guidance_layer.",)),)


def spaces(shapes: Shapes, prefix: str) -> dict[str, dict[str, Target]]:
    d = flux.dims(shapes, prefix)
    out = {"native": native_space(shapes, prefix, flux.LEAVES, flux.FUSED, d)}
    for table in TABLES:
        out[table.space] = expand(table, shapes, prefix, flux.FUSED, d)
    return out


def details(shapes: Shapes, prefix: str) -> dict:
    out = flux.details(shapes, prefix)
    keys = [k[len(prefix):] for k in shapes if k.startswith(prefix)]
    out["approximator_layers"] = count(keys, r"distilled_guidance_layer\.layers\.(\d+)\.")
    return out


CHROMA = Family(
    id="chroma", name="Chroma",
    slots=(Slot(DENOISER, flux.PREFIXES, spaces, CONVENTIONS, label="transformer"),
           t5_slot("text_encoders.t5xxl.transformer."), vae_slot("vae.")),
    signature=Signature(("double_blocks.0.img_attn.qkv.weight", "distilled_guidance_layer.in_proj.weight")),
    lora_signals=(flux.BFL_SHARED, flux.FLUX1_CHROMA, r"distilled_guidance_layer"),
    modelspec=("chroma",),
    details=details,
    widths={3072: "Chroma"},
    diffusers=View("diffusers ChromaTransformer2DModel",
                   Signature(("transformer_blocks.0.attn.to_q.weight", "x_embedder.weight",
                              "distilled_guidance_layer.in_proj.weight")), DIFFUSERS),
)
