"""Command line: parse, call the library, print the report. No merge logic lives here."""

from __future__ import annotations

import json
import signal
import sys
import threading

import click

from ._version import __version__
from .errors import LorakitError
from .interrupts import outside_imports
from .reports import DryRunReport, PlanReport


STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)  # as timeout, systemd, a container stop or a closed terminal send


class Stopped(BaseException):
    """A stop signal arrived: unwinds like Ctrl-C (temporary files are removed on the way out)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _raise_stopped(signum: int) -> None:
    raise Stopped(signum)


_stop = outside_imports(_raise_stopped)


def _fail(message: str, code: int = 1) -> None:
    click.echo(f"lorakit: error: {message}", err=True)
    sys.exit(code)


def _run(fn, *args, as_json: bool = False, **kwargs):
    """Call the library; turn typed errors, Ctrl-C and stop signals into one line and an exit status
    (128 + the signal's number for signals). With ``as_json`` a typed error is also printed as a
    JSON document on stdout, so a ``--json`` caller always gets one."""
    main_thread = threading.current_thread() is threading.main_thread()
    previous = {s: signal.signal(s, _stop) for s in STOP_SIGNALS} if main_thread else {}
    try:
        return fn(*args, **kwargs)
    except LorakitError as e:
        message = " ".join(str(e).split())
        if as_json:
            click.echo(json.dumps({"error": {"type": type(e).__name__, "message": message, "exit_code": e.exit_code}},
                                  indent=1))
        _fail(message, e.exit_code)
    except KeyboardInterrupt:
        _fail("interrupted; nothing was written", 128 + signal.SIGINT)
    except Stopped as e:
        _fail(f"stopped by {signal.Signals(e.signum).name}; nothing was written", 128 + e.signum)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _lora_args(args: tuple[str, ...]) -> list:
    from .planner import parse_lora_arg

    return [parse_lora_arg(a) for a in args]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="lorakit")
def main() -> None:
    """Merge LoRAs into SD1.5 / SDXL / Flux.1 / FLUX.2 / Chroma / Wan / Qwen-Image / Z-Image checkpoints
    exactly and in bounded memory; inspect files; check merges; sample. Every error is one line on stderr and a non-zero exit; no input is ever
    written."""


@main.command()
@click.argument("base", type=click.Path(dir_okay=False), required=False)
@click.argument("loras", nargs=-1, metavar="LORA[:MODEL_STRENGTH[:CLIP_STRENGTH]]...")
@click.option("-o", "--output", "out", type=click.Path(),
              help="Output file (.safetensors); a folder (a name ending with '/') gets <base name>_lorakit.safetensors "
                   "(with --workflow: one per base). Required unless --dry-run.")
@click.option("--workflow", type=click.Path(dir_okay=False), help="Bake the LoRA chain of a ComfyUI workflow JSON.")
@click.option("--models-dir", type=click.Path(file_okay=False), help="ComfyUI models/ folder (with --workflow).")
@click.option("--node", "node_id", help="With --workflow: the LoRA loader node whose chain to bake.")
@click.option("--model-only", is_flag=True, help="Like LoraLoaderModelOnly: ignore text-encoder parts.")
@click.option("--rounding", type=click.Choice(["nearest", "stochastic"]), default=None,
              help="fp8 rounding of changed elements (default: stochastic for fp8, RTNE otherwise).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of stochastic rounding.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--allow-unmatched", is_flag=True, help="Apply what matches; report LoRA keys that address nothing.")
@click.option("--allow-nonfinite", is_flag=True,
              help="Merge even if LoRA factors hold NaN/inf or the result overflows the stored format.")
@click.option("--dry-run", is_flag=True,
              help="Plan only: report what would be applied, write nothing; exit 1 when the real run would fail.")
@click.option("--json", "as_json", is_flag=True, help="Print the report (or the error) as JSON on stdout.")
@click.option("--force", is_flag=True, help="Replace an existing OUT (never an input file).")
@click.option("--in-place", is_flag=True, help="Allow OUT to be BASE (still written to a temporary file first).")
@click.option("--progress/--no-progress", default=None, help="Progress bar on stderr (default: when a terminal).")
def merge(base, loras, out, workflow, models_dir, node_id, model_only, rounding, seed, device, allow_unmatched,
          allow_nonfinite, dry_run, as_json, force, in_place, progress) -> None:
    """Merge LORA(s) into BASE and write OUT. Several LoRAs apply in order, like chained LoraLoader nodes.

    Or bake a ComfyUI workflow's chain: lorakit merge --workflow W.json --models-dir ComfyUI/models [-o OUT]."""
    from .merge import merge_file, plan

    if workflow:
        if base or loras:
            _fail("give either BASE and LORAs or --workflow, not both", 2)
        if not models_dir:
            _fail("--workflow needs --models-dir (ComfyUI's models/ folder)", 2)
        options = dict(rounding=rounding, seed=seed, device=device, allow_unmatched=allow_unmatched,
                       allow_nonfinite=allow_nonfinite, force=force, progress=progress)
        _run(_merge_workflow, workflow, models_dir, out, node_id, dry_run, as_json, options, as_json=as_json)
        return
    if not base or not loras:
        _fail("missing BASE and at least one LORA (or --workflow)", 2)
    specs = _run(_lora_args, loras, as_json=as_json)
    if dry_run:
        p = _run(plan, base, specs, model_only=model_only, allow_unmatched=True, allow_nonfinite=allow_nonfinite,
                 as_json=as_json)
        report = DryRunReport(**p.report_fields(), would_fail=bool(
            not allow_unmatched and any(r.unmatched for r in p.loras)))
        _print_report(report, as_json, model_only)
        sys.exit(1 if report.would_fail else 0)  # the status the real run would end with
    if not out:
        _fail("missing -o/--output OUT (or use --dry-run)", 2)
    _streaming_threads()
    report = _run(merge_file, base, specs, out, model_only=model_only, rounding=rounding, seed=seed, device=device,
                  allow_unmatched=allow_unmatched, allow_nonfinite=allow_nonfinite, force=force, in_place=in_place,
                  progress=progress, as_json=as_json)
    _print_report(report, as_json, model_only)


def _streaming_threads() -> None:
    """The CLI owns its process: leave a core to the merge's I/O threads (a library call never
    changes the process-wide thread count)."""
    import torch

    from .devices import streaming_threads

    torch.set_num_threads(streaming_threads())


def _merge_workflow(workflow: str, models_dir: str, out: str | None, node_id: str | None, dry_run: bool,
                    as_json: bool, options: dict) -> None:
    from pathlib import Path

    from . import workflow as wf
    from .merge import merge_file, plan
    from .planner import LoraSpec

    jobs = wf.plan_jobs(wf.load(workflow), Path(models_dir), node_id=node_id)
    _streaming_threads()
    wf.assign_outputs(jobs, out, make_folder=not dry_run)
    extra = [f"--{k.replace('_', '-')}" for k in ("allow_unmatched", "allow_nonfinite", "force") if options[k]]
    extra += ["--rounding", options["rounding"]] if options["rounding"] else []
    extra += ["--seed", str(options["seed"])] if options["seed"] else []
    reports = []
    for job in jobs:
        click.echo(f"# {job.why}", err=as_json)
        click.echo(job.command(extra + (["--dry-run"] if dry_run else [])), err=as_json)
        specs = [LoraSpec(str(p), m, c) for p, m, c in job.loras]
        if dry_run:
            report = DryRunReport(**plan(job.base, specs, model_only=job.model_only, allow_unmatched=True,
                                         allow_nonfinite=options["allow_nonfinite"]).report_fields())
        else:
            report = merge_file(job.base, specs, job.out, model_only=job.model_only, **options)
        reports.append(report)
        if not as_json:
            _print_report(report, False, job.model_only)
    if as_json:
        click.echo(json.dumps({"workflow": workflow, "jobs": [
            {"command": j.command(extra), "base": str(j.base), "out": str(j.out), "report": r.to_json()}
            for j, r in zip(jobs, reports)]}, indent=1))


def _print_report(report: PlanReport, as_json: bool, model_only: bool) -> None:
    from .render import plan_text

    click.echo(json.dumps(report.to_json(), indent=1) if as_json else plan_text(report, model_only=model_only))


@main.command()
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def inspect(file, as_json) -> None:
    """Describe a LoRA (format, arch, algorithms, ranks, trigger words) or a checkpoint."""
    from .inspect import describe
    from .render import inspect_text

    info = _run(describe, file, as_json=as_json)
    click.echo(json.dumps(info, indent=1) if as_json else inspect_text(info))


@main.command()
@click.argument("base", type=click.Path(dir_okay=False))
@click.argument("loras", nargs=-1, required=True, metavar="LORA[:MODEL_STRENGTH[:CLIP_STRENGTH]]...")
@click.option("--merged", type=click.Path(dir_okay=False), help="The merged file to check (default: lorakit's own "
              "merge, in memory).")
@click.option("--model-only", is_flag=True, help="The merge ignored text-encoder parts (LoraLoaderModelOnly).")
@click.option("--rounding", type=click.Choice(["nearest", "stochastic"]), default=None,
              help="fp8 rounding the merge used (sets the expected noise floor).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--no-model", is_flag=True, help="Skip the model-level check (denoiser forward in fp32).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="Where the model-level check runs.")
@click.option("--progress/--no-progress", default=None, help="Progress on stderr (default: when a terminal).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def check(base, loras, merged, model_only, rounding, seed, no_model, device, progress, as_json) -> None:
    """Check that LORA(s) landed in a merge of BASE: per tensor, at model level, and for NaN/inf/saturation.

    Exit status: 0 PASS (nothing failed, the change was confirmed); 1 FAIL; 3 INCONCLUSIVE (nothing
    failed, but every change is below what the stored format can hold, so nothing was confirmed);
    2 bad arguments."""
    from .check import check as run_check
    from .render import check_text

    specs = _run(_lora_args, loras, as_json=as_json)
    report = _run(run_check, base, specs, merged=merged, model_only=model_only, rounding=rounding, seed=seed,
                  model_check=not no_model, device=device, progress=progress, as_json=as_json)
    data = report.to_json()
    click.echo(json.dumps(data, indent=1) if as_json else check_text(data))
    sys.exit(report.exit_code)


@main.command()
@click.argument("lora", type=click.Path(dir_okay=False))
@click.option("-o", "--output", "out", required=True, type=click.Path(dir_okay=False), help="Output file (.safetensors).")
@click.option("--to", "to", required=True, type=click.Choice(["comfy", "kohya", "diffusers"]),
              help="comfy: names ComfyUI loads natively; kohya: lora_unet_ / lora_te*_ (sd-scripts, musubi-tuner, "
                   "Forge); diffusers: PEFT names + lora_adapter_metadata (load_lora_weights).")
@click.option("--base", type=click.Path(dir_okay=False), help="A checkpoint of the LoRA's model: its header gives the "
              "layout (its tensors are not read).")
@click.option("--arch", help="The architecture BASE must be (e.g. flux1-dev, sdxl, wan2.1-t2v-14b).")
@click.option("--dtype", type=click.Choice(["keep", "fp16", "bf16", "fp32"]), default="keep", show_default=True,
              help="Store the factors in this dtype (keep: as the source stores them).")
@click.option("--split-fused", "split_fused", is_flag=True, help="Write fused modules (Flux qkv) as their parts "
              "where the naming has names for them.")
@click.option("--fuse-split", "fuse_split", is_flag=True, help="Write split parts (q, k, v) as one fused module "
              "where the naming has one.")
@click.option("--check", "check_base", type=click.Path(dir_okay=False), help="Merge LORA and OUT into this BASE in "
              "memory and compare every touched tensor (PASS: the same bits; exit 1 otherwise).")
@click.option("--allow-unmatched", is_flag=True, help="Leave out keys that address nothing in BASE (reported).")
@click.option("--force", is_flag=True, help="Replace an existing OUT (never an input file).")
@click.option("--json", "as_json", is_flag=True, help="Print the report (or the error) as JSON on stdout.")
def convert(lora, out, to, base, arch, dtype, split_fused, fuse_split, check_base, allow_unmatched, force,
            as_json) -> None:
    """Rewrite LORA in the key names another tool loads, exactly (no SVD, no approximation): the same
    change of the same weights, fused and split modules converted losslessly."""
    from .convert import convert_file
    from .render import convert_text

    if split_fused and fuse_split:
        _fail("give --split-fused or --fuse-split, not both", 2)
    layout = "split" if split_fused else "fuse" if fuse_split else "auto"
    report = _run(convert_file, lora, out, to=to, base=base, arch=arch, dtype=dtype, layout=layout,
                  check=check_base, force=force, allow_unmatched=allow_unmatched, as_json=as_json)
    click.echo(json.dumps(report.to_json(), indent=1) if as_json else convert_text(report))
    if report.check is not None and report.check["result"] != "PASS":
        sys.exit(1)


@main.command()
@click.argument("ckpt", type=click.Path(dir_okay=False), required=False)
@click.option("--unet", type=click.Path(dir_okay=False), help="Flux.1 transformer file (with --clip-l, --t5, --vae).")
@click.option("--clip-l", "clip_l", type=click.Path(dir_okay=False), help="CLIP-L text encoder file (Flux).")
@click.option("--t5", type=click.Path(dir_okay=False), help="T5-XXL encoder file (Flux).")
@click.option("--vae", type=click.Path(dir_okay=False), help="Autoencoder file, e.g. ae.safetensors (Flux).")
@click.option("--lora", "loras", multiple=True, metavar="LORA[:M[:C]]", help="A LoRA to patch in (repeatable).")
@click.option("--prompt", required=True)
@click.option("--negative", default="", help="Negative prompt (unused at cfg 1).")
@click.option("--steps", type=int, default=20, show_default=True)
@click.option("--cfg", type=float, default=None, help="CFG scale (default 8 for SD, 1 for Flux).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--sampler", type=click.Choice(["euler"]), default="euler", show_default=True)
@click.option("--scheduler", type=click.Choice(["normal", "simple"]), default="normal", show_default=True)
@click.option("--width", type=int, default=None, help="Pixels (default 512 for SD1.5, 1024 for SDXL / Flux).")
@click.option("--height", type=int, default=None, help="Pixels (default: the width).")
@click.option("--guidance", type=float, default=3.5, show_default=True, help="Flux.1-dev guidance (FluxGuidance).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--dtype", type=click.Choice(["auto", "fp32", "fp16", "bf16"]), default="auto", show_default=True,
              help="Compute dtype (auto: fp32 on the CPU; fp16 for SD, bf16 for Flux on a GPU; fp8 weights are "
                   "computed in it).")
@click.option("--tokenizers", type=click.Path(file_okay=False), help="Folder with clip/ (vocab.json, merges.txt) "
              "and t5/ (tokenizer.json); default: $LORAKIT_TOKENIZERS, a ComfyUI install, the HF cache.")
@click.option("-o", "--output", "out", required=True, type=click.Path(dir_okay=False))
@click.option("--force", is_flag=True, help="Replace an existing output file.")
@click.option("--progress/--no-progress", default=None, help="Progress bar on stderr (default: when a terminal).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def sample(ckpt, unet, clip_l, t5, vae, loras, prompt, negative, steps, cfg, seed, sampler, scheduler, width, height,
           guidance, device, dtype, tokenizers, out, force, progress, as_json) -> None:
    """Generate an image: SD1.5 / SDXL (or an all-in-one Flux.1 checkpoint) from CKPT, Flux.1 from
    --unet --clip-l --t5 --vae; writes a PNG with its parameters."""
    import torch

    from .sampler import Options
    from .sampler import sample as run_sample

    from .devices import resolve_device

    device = _run(resolve_device, device).type
    dt = {"auto": None, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    opt = Options(prompt, negative, steps, cfg, seed, sampler, scheduler, width, height, guidance, device, dt,
                  tokenizers, progress)
    report = _run(run_sample, out, opt, ckpt=ckpt, unet=unet, clip_l=clip_l, t5=t5, vae=vae,
                  loras=_run(_lora_args, loras), force=force)
    if as_json:
        click.echo(json.dumps(report, indent=1))
    else:
        click.echo(f"wrote {report['out']}: {report['width']}x{report['height']}, {report['steps']} steps "
                   f"{report['sampler']}/{report['scheduler']}, cfg {report['cfg']}, seed {report['seed']}, "
                   f"{report['seconds']:.1f} s")


@main.command()
@click.option("--keep", type=click.Path(file_okay=False), default=None, help="Write the demo files here and keep them.")
def demo(keep) -> None:
    """Build a small SD1.5-layout checkpoint and a kohya LoRA, merge, inspect, and verify."""
    from .demo import run_demo

    sys.exit(_run(run_demo, keep))


if __name__ == "__main__":
    main()
