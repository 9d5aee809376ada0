"""Factor roles and how each naming spells them.

A LoRA key is ``<module name><suffix>``; the suffix says which factor it is (its *role*). Each
role style is one trainer's spelling (used to write a file); the suffix table that reads files is
their union, so a new spelling is one entry here."""

from __future__ import annotations

# LyCORIS algorithm factors (kohya-style networks; applied by the adapters of their own modules)
LYCORIS = {
    "hada_w1_a": ".hada_w1_a", "hada_w1_b": ".hada_w1_b", "hada_w2_a": ".hada_w2_a", "hada_w2_b": ".hada_w2_b",
    "hada_t1": ".hada_t1", "hada_t2": ".hada_t2",
    "lokr_w1": ".lokr_w1", "lokr_w1_a": ".lokr_w1_a", "lokr_w1_b": ".lokr_w1_b",
    "lokr_w2": ".lokr_w2", "lokr_w2_a": ".lokr_w2_a", "lokr_w2_b": ".lokr_w2_b", "lokr_t2": ".lokr_t2",
    "oft_blocks": ".oft_blocks", "rescale": ".rescale",
    "a1": ".a1.weight", "a2": ".a2.weight", "b1": ".b1.weight", "b2": ".b2.weight",
    "ia3_weight": ".weight", "on_input": ".on_input",
}
ROLE_STYLES: dict[str, dict[str, str]] = {
    # kohya / LyCORIS LoRA, LoCon (+Tucker mid), full diffs and replacements, DoRA magnitude
    "kohya": {"down": ".lora_down.weight", "up": ".lora_up.weight", "mid": ".lora_mid.weight", "alpha": ".alpha",
              "diff": ".diff", "diff_b": ".diff_b", "set": ".set_weight", "dora_scale": ".dora_scale", **LYCORIS},
    # PEFT / diffusers / ai-toolkit / BFL wrapper
    "peft": {"down": ".lora_A.weight", "up": ".lora_B.weight", "up_bias": ".lora_B.bias",
             "dora_scale": ".lora_magnitude_vector"},
    "peft-default": {"down": ".lora_A.default.weight", "up": ".lora_B.default.weight"},  # DiffSynth
    # diffusers' converted and legacy attention-processor files
    "diffusers": {"down": ".lora.down.weight", "up": ".lora.up.weight"},
    "diffusers-linear": {"down": ".lora_linear_layer.down.weight", "up": ".lora_linear_layer.up.weight"},
    "diffusers-processor": {"down": "_lora.down.weight", "up": "_lora.up.weight"},
    # XLabs processors (module name ends in qkv_lora1 / proj_lora ...)
    "xlabs": {"down": ".down.weight", "up": ".up.weight"},
    # BFL control LoRAs replace norm scales; LyCORIS norm modules carry full deltas of weight and bias
    "bfl": {"set": ".scale"},
    "lycoris-norm": {"diff": ".w_norm", "diff_b": ".b_norm"},
    "lycoris-oft": {"oft_blocks": ".oft_diag"},
}


def _read_table() -> dict[str, str]:
    table: dict[str, str] = {}
    for style, roles in ROLE_STYLES.items():
        for role, suffix in roles.items():
            if table.setdefault(suffix, role) != role:
                raise ValueError(f"role style {style}: suffix {suffix!r} already means {table[suffix]!r}")
    return table


SUFFIX_ROLES = _read_table()  # suffix -> role, for reading any file
SUFFIXES = sorted(SUFFIX_ROLES, key=len, reverse=True)  # tried longest first

# dimensions a factor of each role may have (min, max); roles not listed may have any. Checked before
# any math, so a malformed file is reported naming the key, never an IndexError deep in an adapter.
ROLE_DIMS = {
    "down": (2, 5), "up": (2, 5), "mid": (3, 5),
    "hada_w1_a": (2, 2), "hada_w1_b": (2, 2), "hada_w2_a": (2, 2), "hada_w2_b": (2, 2),
    "hada_t1": (3, 5), "hada_t2": (3, 5),
    "lokr_w1": (2, 5), "lokr_w2": (2, 5), "lokr_w1_a": (2, 2), "lokr_w1_b": (2, 2), "lokr_w2_a": (2, 2),
    "lokr_w2_b": (2, 2), "lokr_t2": (3, 5),
    "oft_blocks": (3, 4), "a1": (2, 5), "a2": (2, 5), "b1": (2, 5), "b2": (2, 5),
    "up_bias": (1, 1), "diff_b": (1, 1),
}
SCALAR_ROLES = ("alpha", "on_input")  # one number each (shape [] or [1])


def role_problem(role: str, shape: tuple[int, ...]) -> str | None:
    """Why a tensor of ``shape`` cannot be a factor of ``role`` (None: it can)."""
    if role in SCALAR_ROLES:
        n = 1
        for d in shape:
            n *= d
        return None if n == 1 else f"'{role}' must be one number, this tensor has shape {list(shape)}"
    lo, hi = ROLE_DIMS.get(role, (0, 8))
    if not lo <= len(shape) <= hi:
        need = str(lo) if lo == hi else f"{lo} to {hi}"
        return f"'{role}' factor needs {need} dimensions, this tensor has {len(shape)} ({list(shape)})"
    if role in ROLE_DIMS and 0 in shape:
        return f"'{role}' factor has an empty dimension ({list(shape)})"
    return None
