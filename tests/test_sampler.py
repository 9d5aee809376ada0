"""Schedules (golden sigma lists from ../shared/docs/sampler.md), Euler, tokenizers against the Hugging
Face tokenizers on ../shared/tokenizers, and tiny end-to-end `lorakit sample` runs (deterministic)."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from lorakit.cli import main
from lorakit.sampler.pipeline import _euler
from lorakit.progress import Progress
from lorakit.sampler.schedule import FLUX_DEV, FLUX_SCHNELL, Discrete, flux_mu, sigmas
from lorakit.sampler.tokenize import (ClipTokenizer, T5Tokenizer, TokenizerError, _bytes_to_unicode, clip_tokens,
                                      find, parse_weights, t5_tokens)
from lorakit.models.vae import AutoencoderKL
from tests.conftest import ROOT

TOKENIZERS = ROOT.parent / "shared" / "tokenizers"
SD15_NORMAL_20 = [14.61464, 10.7468, 8.081519, 6.204935, 4.855652, 3.865378, 3.123761, 2.557166, 2.115658, 1.764822,
                  1.480581, 1.245813, 1.048142, 0.878428, 0.729719, 0.596434, 0.473585, 0.355545, 0.232164, 0.029167, 0]
FLUX_NORMAL_20 = [1.0, 0.982719, 0.964099, 0.943978, 0.922167, 0.898443, 0.872545, 0.844158, 0.812905, 0.77833,
                  0.739873, 0.69684, 0.648365, 0.593345, 0.530358, 0.457538, 0.37239, 0.271491, 0.150027, 0.000997, 0]
PROMPTS = ["pixel_art,high quality", "a photo of an astronaut riding a horse on mars",
           "masterpiece, best quality, (detailed:1.2), 1girl, solo", "It's the cat's   PAJAMAS!!! 42 ½ x²",
           "Ünïcödé café — naïve résumé, 東京 タワー 🐱", "don't you've we'll I'm they'd", "tab\there\nnewline", ""]


def close(got: torch.Tensor, golden: list[float]) -> bool:
    return len(got) == len(golden) and all(abs(float(a) - b) <= 1e-6 * max(1.0, b) for a, b in zip(got, golden))


def test_golden_sigmas() -> None:
    assert close(sigmas(Discrete(), 20, "normal"), SD15_NORMAL_20)
    assert close(sigmas(FLUX_DEV, 20, "normal"), FLUX_NORMAL_20)
    simple = sigmas(FLUX_DEV, 20, "simple")
    assert close(simple[:2], [1.0, 0.983608]) and close(simple[-3:], [0.259758, 0.142529, 0])
    assert close(sigmas(FLUX_SCHNELL, 4, "normal"), [1.0, 0.667, 0.334, 0.001, 0])
    assert flux_mu(1024, 1024) == pytest.approx(1.15)


def test_sd_timesteps_are_the_nearest_integers() -> None:
    t = Discrete().timestep(sigmas(Discrete(), 20)[:-1])
    assert t[:4].tolist() == [999, 946, 894, 841] and t[-2:].tolist() == [53, 0]


def test_euler_lands_on_a_constant_denoiser() -> None:
    """With denoised == c everywhere, each step shrinks x - c by s_next / s, and the last (to 0) lands on c."""
    sig = sigmas(Discrete(), 5)
    c = torch.full((1, 4, 2, 2), 0.25)
    x0 = torch.randn(1, 4, 2, 2) * float(sig[0])
    seen = []
    out = _euler(lambda x, s: seen.append(float(s)) or c, x0, sig, Progress(5, "test", enabled=False))
    assert seen == [float(s) for s in sig[:-1]] and torch.equal(out, c)


@pytest.fixture(scope="module")
def hf_tokenizers():
    import transformers

    return (transformers.CLIPTokenizer.from_pretrained(str(TOKENIZERS / "clip")),
            transformers.AutoTokenizer.from_pretrained(str(TOKENIZERS / "t5")))


@pytest.mark.parametrize("prompt", PROMPTS)
def test_tokenizers_match_hugging_face(prompt: str, hf_tokenizers) -> None:
    hf_clip, hf_t5 = hf_tokenizers
    assert ClipTokenizer(TOKENIZERS / "clip").encode(prompt) == hf_clip(prompt, add_special_tokens=False)["input_ids"]
    assert T5Tokenizer(TOKENIZERS / "t5").encode(prompt) == hf_t5(prompt, add_special_tokens=False)["input_ids"]


def test_prompt_chunks_and_weights() -> None:
    tok = ClipTokenizer(TOKENIZERS / "clip")
    t = clip_tokens(tok, "pixel_art,(high quality:1.3)")
    assert len(t.ids) == 1 and len(t.ids[0]) == 77 and t.ids[0][0] == 49406
    body = tok.encode("pixel_art,") + tok.encode("high quality")
    assert t.ids[0][1:1 + len(body)] == body and set(t.ids[0][1 + len(body):]) == {49407}
    n = len(tok.encode("pixel_art,"))
    assert t.weights[0][1:1 + len(body)] == [1.0] * n + [1.3] * (len(body) - n)
    long = clip_tokens(tok, "word " * 100, pad=0)
    assert len(long.ids) == 2 and long.ids[1][1 + 25] == 49407 and long.ids[1][-1] == 0
    word = "astronautically"  # 3 tokens: moved whole to the next chunk rather than split
    straddle = clip_tokens(tok, "a " * 74 + word)
    assert straddle.ids[0][75:] == [49407, 49407] and straddle.ids[1][1:5] == tok.encode(word) + [49407]
    big = "x" * 40  # a word of >= 8 tokens fills the chunk and continues in the next
    n = len(tok.encode(big))
    split = clip_tokens(tok, "a " * 70 + big)
    assert n >= 8 and split.ids[0][71:76] == tok.encode(big)[:5] and split.ids[1][1:n - 4] == tok.encode(big)[5:]
    assert parse_weights("a (b) ((c)) (d:0.5) \\(e\\)") == [("a ", 1.0), ("b", 1.1), (" ", 1.0),
                                                              ("c", pytest.approx(1.21)), (" ", 1.0), ("d", 0.5),
                                                              (" (e)", 1.0)]
    t5 = t5_tokens(T5Tokenizer(TOKENIZERS / "t5"), "pixel_art")
    assert len(t5.ids[0]) == 256 and t5.ids[0][len(t5.ids[0]) - t5.ids[0][::-1].index(1) - 1] == 1


def test_missing_tokenizer_says_where_it_looked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("LORAKIT_TOKENIZERS", "COMFYUI_PATH"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(TokenizerError, match="LORAKIT_TOKENIZERS.*ComfyUI"):
        find("t5")
    assert find("clip", TOKENIZERS) == TOKENIZERS / "clip"


# -- tiny end-to-end runs ------------------------------------------------------------------------

def tiny_tokenizers(folder: Path) -> Path:
    """CLIP BPE and T5 Unigram data small enough for the zoo's 1000-token encoders."""
    clip = folder / "clip"
    clip.mkdir(parents=True)
    vocab = {"<|startoftext|>": 0, "<|pad|>": 1, "<|endoftext|>": 2}
    for ch in _bytes_to_unicode().values():
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    merges = [("p", "i"), ("pi", "x"), ("e", "l</w>"), ("a", "r"), ("ar", "t</w>")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    (clip / "vocab.json").write_text(json.dumps(vocab))
    (clip / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    import tokenizers
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)] + [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz,_"]
    pieces += [("▁pixel", -3.0), ("_art", -3.0), ("▁a", -3.0), ("▁cat", -3.0)]
    tok = tokenizers.Tokenizer(tokenizers.models.Unigram(pieces, unk_id=2))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Metaspace()
    (folder / "t5").mkdir()
    tok.save(str(folder / "t5" / "tokenizer.json"))
    return folder


def tiny_ae(path: Path) -> Path:
    """A random 16-channel autoencoder in the Flux ae.safetensors layout (2 levels)."""
    from tests.helpers import autoencoder_shapes as _ae_shapes

    ae = AutoencoderKL(_ae_shapes(32, 32))
    g = torch.Generator().manual_seed(0)
    save_file({k: torch.randn(v.shape, generator=g) * 0.05 for k, v in ae.state_dict().items()}, str(path))
    return path


def png_info(path: Path) -> tuple[int, int, dict[str, str]]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, text, size = 8, {}, None
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + n]
        assert struct.unpack(">I", data[pos + 8 + n:pos + 12 + n])[0] == zlib.crc32(kind + body)
        if kind == b"IHDR":
            size = struct.unpack(">II", body[:8])
        elif kind == b"tEXt":
            k, v = body.split(b"\x00", 1)
            text[k.decode()] = v.decode("latin-1")
        pos += 12 + n
    return size[0], size[1], text


def sample(args: list[str]) -> None:
    res = CliRunner().invoke(main, ["sample", *args, "--no-progress"], catch_exceptions=False)
    assert res.exit_code == 0, res.output


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_sd_sample_is_deterministic(zoo: Path, tmp_path: Path, arch: str) -> None:
    toks = tiny_tokenizers(tmp_path / "tok")
    ckpt = str(zoo / f"base/{arch}/{arch}_tiny_single_file.safetensors")
    common = [ckpt, "--prompt", "pixel_art, (a cat:1.2)", "--negative", "blurry", "--steps", "3", "--width", "64",
              "--tokenizers", str(toks)]
    a, b, c, d = (tmp_path / f"{n}.png" for n in "abcd")
    sample(common + ["--seed", "1", "-o", str(a)])
    sample(common + ["--seed", "1", "-o", str(b)])
    sample(common + ["--seed", "2", "-o", str(c)])
    lora = "kohya/sd15_kohya_lora.safetensors" if arch == "sd15" else "kohya/sdxl_kohya_lora_subset.safetensors"
    sample(common + ["--seed", "1", "--lora", f"{zoo / lora}:1.0", "-o", str(d)])
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes() and a.read_bytes() != d.read_bytes()
    w, h, text = png_info(a)
    assert (w, h) == (64, 64)
    assert text["parameters"].startswith("pixel_art, (a cat:1.2)\nNegative prompt: blurry\nSteps: 3, Sampler: euler")
    assert json.loads(text["lorakit"])["seed"] == 1


@pytest.mark.parametrize("unet", ["flux1_tiny_dev_bfl", "flux1_tiny_dev_fp8_e4m3fn_scaled"])
def test_flux_sample_is_deterministic(zoo: Path, tmp_path: Path, unet: str) -> None:
    toks = tiny_tokenizers(tmp_path / "tok")
    ae = tiny_ae(tmp_path / "ae.safetensors")
    common = ["--unet", str(zoo / f"base/flux/{unet}.safetensors"),
              "--clip-l", str(zoo / "base/flux/clip_l_tiny.safetensors"),
              "--t5", str(zoo / "base/flux/t5xxl_tiny.safetensors"), "--vae", str(ae),
              "--prompt", "pixel_art", "--steps", "2", "--width", "64", "--tokenizers", str(toks)]
    a, b, c = (tmp_path / f"{n}.png" for n in "abc")
    sample(common + ["-o", str(a)])
    sample(common + ["-o", str(b)])
    sample(common + ["--lora", f"{zoo / 'flux/flux_aitoolkit_lora.safetensors'}:1.0", "-o", str(c)])
    assert a.read_bytes() == b.read_bytes() != c.read_bytes()
    assert "CFG scale: 1.0" in png_info(a)[2]["parameters"]


def pixels(path: Path) -> bytes:
    data, pos, out = path.read_bytes(), 8, b""
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos:pos + 8])
        if kind == b"IDAT":
            out += data[pos + 8:pos + 8 + n]
        pos += 12 + n
    return zlib.decompress(out)


def test_flux_all_in_one_checkpoint(zoo: Path, tmp_path: Path) -> None:
    """ComfyUI's Flux checkpoints hold the transformer, both text encoders and the VAE in one file:
    sampling from it gives the same pixels as from the four separate files."""
    from safetensors.torch import load_file

    toks = tiny_tokenizers(tmp_path / "tok")
    ae = tiny_ae(tmp_path / "ae.safetensors")
    files = {"model.diffusion_model.": "base/flux/flux1_tiny_dev_bfl.safetensors",
             "text_encoders.clip_l.transformer.": "base/flux/clip_l_tiny.safetensors",
             "text_encoders.t5xxl.transformer.": "base/flux/t5xxl_tiny.safetensors"}
    merged = {p + k: v for p, f in files.items() for k, v in load_file(zoo / f).items()}
    merged.update({"vae." + k: v for k, v in load_file(ae).items()})
    ckpt = tmp_path / "flux_all_in_one.safetensors"
    save_file(merged, str(ckpt))
    lora = f"{zoo / 'flux/flux_aitoolkit_lora.safetensors'}:0.8"
    common = ["--prompt", "pixel_art", "--steps", "2", "--width", "64", "--tokenizers", str(toks), "--lora", lora]
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    sample([str(ckpt), *common, "-o", str(a)])
    sample(["--unet", str(zoo / files["model.diffusion_model."]), "--clip-l", str(zoo / files[
        "text_encoders.clip_l.transformer."]), "--t5", str(zoo / files["text_encoders.t5xxl.transformer."]),
            "--vae", str(ae), *common, "-o", str(b)])
    assert pixels(a) == pixels(b)
    assert "CFG scale: 1.0" in png_info(a)[2]["parameters"]


def test_sample_refuses_an_existing_output(zoo: Path, tmp_path: Path) -> None:
    out = tmp_path / "x.png"
    out.write_bytes(b"keep")
    res = CliRunner().invoke(main, ["sample", str(zoo / "base/sd15/sd15_tiny_single_file.safetensors"), "--prompt",
                                    "a", "-o", str(out)])
    assert res.exit_code != 0 and "already exists" in res.output and out.read_bytes() == b"keep"
