"""Read a ComfyUI workflow (UI or API JSON) and turn its LoRA chain into ``lorakit merge`` jobs.

A chain runs from a model loader (CheckpointLoaderSimple / UNETLoader) through LoraLoader and
LoraLoaderModelOnly nodes along the MODEL links. Model strengths go to the diffusion-model file;
a LoraLoader's CLIP strength goes to the text-encoder files its CLIP input leads back to (the
checkpoint itself, or CLIPLoader / DualCLIPLoader files). Bypassed (mode 4) and muted (mode 2)
nodes pass their input through.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from .errors import WorkflowError
from .outputs import is_folder
from .planner import strength_value


# node type -> (widget names in UI order, {output slot: type})
NODES: dict[str, tuple[list[str], dict[int, str]]] = {
    "CheckpointLoaderSimple": (["ckpt_name"], {0: "MODEL", 1: "CLIP", 2: "VAE"}),
    "UNETLoader": (["unet_name", "weight_dtype"], {0: "MODEL"}),
    "CLIPLoader": (["clip_name", "type", "device"], {0: "CLIP"}),
    "DualCLIPLoader": (["clip_name1", "clip_name2", "type", "device"], {0: "CLIP"}),
    "LoraLoader": (["lora_name", "strength_model", "strength_clip"], {0: "MODEL", 1: "CLIP"}),
    "LoraLoaderModelOnly": (["lora_name", "strength_model"], {0: "MODEL"}),
}
LORA_NODES = {"LoraLoader", "LoraLoaderModelOnly"}
PASS_THROUGH_MODES = {2: "muted", 4: "bypassed"}
# model folder kinds -> sub-folders of ComfyUI's models/ searched in order
FOLDERS = {
    "ckpt_name": ["checkpoints"],
    "unet_name": ["unet", "diffusion_models"],
    "clip_name": ["clip", "text_encoders"],
    "clip_name1": ["clip", "text_encoders"],
    "clip_name2": ["clip", "text_encoders"],
    "lora_name": ["loras"],
}


@dataclass
class Node:
    id: str
    type: str
    mode: int = 0
    values: dict[str, object] = field(default_factory=dict)
    links: dict[str, tuple[str, int]] = field(default_factory=dict)  # input name -> (source id, slot)

    @property
    def active(self) -> bool:
        return self.mode not in PASS_THROUGH_MODES


@dataclass
class Job:
    base: Path
    loras: list[tuple[Path, float, float]]
    model_only: bool
    out: Path | None = None
    why: str = ""

    def command(self, extra: list[str]) -> str:
        args = ["lorakit", "merge", str(self.base)] + [f"{p}:{m:g}:{c:g}" for p, m, c in self.loras]
        if self.out is not None:
            args += ["-o", str(self.out)]
        if self.model_only:
            args.append("--model-only")
        return " ".join(shlex.quote(a) for a in args + extra)


def load(path: str | Path) -> dict[str, Node]:
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise WorkflowError(f"{path}: workflow file not found") from None
    except IsADirectoryError:
        raise WorkflowError(f"{path}: is a folder, expected a workflow .json file") from None
    except RecursionError:
        raise WorkflowError(f"{path}: not a JSON workflow (nested too deeply)") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise WorkflowError(f"{path}: not a JSON workflow ({str(e).splitlines()[0][:100]})") from None
    except OSError as e:
        raise WorkflowError(f"{path}: cannot read ({e.strerror})") from None
    if isinstance(doc, dict) and isinstance(doc.get("nodes"), list):
        return _from_ui(doc, str(path))
    if isinstance(doc, dict) and doc and all(isinstance(v, dict) and "class_type" in v for v in doc.values()):
        return _from_api(doc, str(path))
    raise WorkflowError(f"{path}: neither a ComfyUI UI workflow (nodes + links) nor an API prompt (class_type)")


def _id(value: object, name: str, what: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise WorkflowError(f"{name}: {what} {str(value)[:40]!r} is not a node id")
    return str(value)


def _slot(value: object, name: str, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise WorkflowError(f"{name}: {what} {str(value)[:40]!r} is not an output slot number")
    return value


def _mode(value: object, name: str, nid: str) -> int:
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int):
        raise WorkflowError(f"{name}: node {nid} has mode {str(value)[:40]!r}, not a number")
    return value


def _from_ui(doc: dict, name: str) -> dict[str, Node]:
    links = {}
    for link in doc.get("links") or []:
        if isinstance(link, list) and len(link) >= 5:
            links[_id(link[0], name, "link")] = (_id(link[1], name, "link origin"), _slot(link[2], name, "link slot"))
        elif isinstance(link, dict) and {"id", "origin_id", "origin_slot"} <= link.keys():
            links[_id(link["id"], name, "link")] = (_id(link["origin_id"], name, "link origin"),
                                                    _slot(link["origin_slot"], name, "link slot"))
    nodes = {}
    for raw in doc["nodes"]:
        if not isinstance(raw, dict) or "id" not in raw:
            raise WorkflowError(f"{name}: a node without an id")
        nid = _id(raw["id"], name, "node id")
        node = Node(nid, str(raw.get("type", "?")), _mode(raw.get("mode"), name, nid))
        widgets = raw.get("widgets_values") or []
        if node.type in NODES and isinstance(widgets, list):
            node.values = dict(zip(NODES[node.type][0], widgets))
        for inp in raw.get("inputs") or []:
            if not isinstance(inp, dict):
                continue
            if inp.get("link") is not None:
                link = _id(inp["link"], name, f"node {nid} input link")
                if link not in links:
                    raise WorkflowError(f"{name}: node {nid} ({node.type}) input {inp.get('name')} uses link "
                                        f"{link}, which the links table lacks")
                node.links[str(inp.get("name"))] = links[link]
        nodes[node.id] = node
    return nodes


def _from_api(doc: dict, name: str) -> dict[str, Node]:
    nodes = {}
    for nid, raw in doc.items():
        node = Node(str(nid), str(raw["class_type"]), _mode(raw.get("mode"), name, str(nid)))
        inputs = raw.get("inputs") or {}
        if not isinstance(inputs, dict):
            raise WorkflowError(f"{name}: node {nid} has inputs that are not an object")
        for k, v in inputs.items():
            if isinstance(v, list) and len(v) == 2 and isinstance(v[1], int) and not isinstance(v[1], bool) \
                    and isinstance(v[0], (str, int)) and not isinstance(v[0], bool):
                node.links[k] = (str(v[0]), v[1])
            else:
                node.values[k] = v
        nodes[node.id] = node
    return nodes


def _source(nodes: dict[str, Node], start: tuple[str, int], kind: str, path: list[Node]) -> Node:
    """Follow a MODEL or CLIP link upstream, through LoRA loaders and pass-through nodes, to its loader.
    LoRA loaders met on the way are appended to ``path`` (nearest first)."""
    nid, slot = start
    seen = set()
    while True:
        if nid in seen:
            raise WorkflowError(f"the {kind} links form a cycle at node {nid}")
        seen.add(nid)
        node = nodes.get(nid)
        if node is None:
            raise WorkflowError(f"a {kind} link points at node {nid}, which the workflow lacks")
        upstream = node.links.get(kind.lower())
        if not node.active:
            if upstream is None:
                raise WorkflowError(f"node {nid} ({node.type}) is {PASS_THROUGH_MODES[node.mode]} and has no "
                                    f"{kind} input to pass through")
            nid, slot = upstream
            continue
        if node.type in LORA_NODES:
            path.append(node)
            if upstream is None:
                raise WorkflowError(f"node {nid} ({node.type}) has no {kind.lower()} input connected")
            nid, slot = upstream
            continue
        if node.type in NODES and NODES[node.type][1].get(slot) == kind:
            return node
        raise WorkflowError(f"node {nid} of type {node.type} sits on the {kind} path between a model loader and "
                            f"the LoRA loaders; lorakit knows {', '.join(sorted(NODES))}")


def _relative(node: Node, field_name: str, name: object) -> Path:
    """A model name from the workflow as a path that cannot leave the folder it is looked up in:
    no absolute paths or drive letters, no '..', no NUL (Windows '\\' read as '/')."""
    if not isinstance(name, str) or not name:
        raise WorkflowError(f"node {node.id} ({node.type}) has no {field_name}")
    shown = name[:120]
    if "\0" in name:
        raise WorkflowError(f"node {node.id} ({node.type}): {field_name} {shown!r} contains a NUL byte")
    norm = name.replace("\\", "/")
    if norm.startswith("/") or re.match(r"[A-Za-z]:", norm):
        raise WorkflowError(f"node {node.id} ({node.type}): {field_name} {shown!r} is an absolute path; names are "
                            "relative to the models folder")
    parts = [p for p in norm.split("/") if p not in ("", ".")]
    if ".." in parts or not parts:
        raise WorkflowError(f"node {node.id} ({node.type}): {field_name} {shown!r} leaves the models folder")
    return Path(*parts)


def _resolve(node: Node, field_name: str, models_dir: Path) -> Path:
    rel = _relative(node, field_name, node.values.get(field_name))
    folders = FOLDERS[field_name]
    for sub in folders:
        candidate = models_dir / sub / rel
        if candidate.is_file():
            return candidate
    searched = ", ".join(str(models_dir / s) for s in folders)
    raise WorkflowError(f"node {node.id} ({node.type}): {node.values[field_name]} not found (searched {searched})")


def _strength(node: Node, key: str) -> float:
    return strength_value(node.values.get(key, 1.0), f"node {node.id} ({node.type}) {key}")


def plan_jobs(nodes: dict[str, Node], models_dir: Path, *, node_id: str | None = None) -> list[Job]:
    """The merge jobs of a workflow: one per base file its LoRA chains end in. Several chains are
    baked together when each starts from its own model loader (Wan 2.2 A14B: a high-noise and a
    low-noise UNETLoader, each with its LoRAs); chains that share a loader are alternatives, and
    ``--node`` picks one."""
    loras = [n for n in nodes.values() if n.type in LORA_NODES and n.active]
    if not loras:
        raise WorkflowError("the workflow has no active LoraLoader / LoraLoaderModelOnly node")
    chains: dict[str, tuple[Node, list[Node]]] = {}
    inner: set[str] = set()
    for lora in loras:
        path: list[Node] = []
        src = _source(nodes, (lora.id, 0), "MODEL", path)
        chains[lora.id] = (src, list(reversed(path)))  # loader first, in application order
        inner.update(n.id for n in path if n.id != lora.id)
    terminals = sorted(nid for nid in chains if nid not in inner)
    if node_id is not None:
        if node_id not in chains:
            raise WorkflowError(f"--node {node_id}: not an active LoRA loader node (these are: {', '.join(sorted(chains))})")
        terminals = [node_id]
    sources = [chains[t][0].id for t in terminals]
    if len(set(sources)) < len(sources):
        desc = "; ".join(f"node {t} ({len(chains[t][1])} LoRAs from {chains[t][0].type} {chains[t][0].id})"
                         for t in terminals)
        raise WorkflowError(f"the workflow has {len(terminals)} separate LoRA chains on one model ({desc}); choose one with "
                            "--node ID")
    jobs: list[Job] = []
    for t in terminals:
        jobs += _chain_jobs(nodes, *chains[t], models_dir)
    bases = [j.base for j in jobs]
    if len(set(bases)) < len(bases):
        raise WorkflowError(f"two LoRA chains bake into the same file ({next(b for b in bases if bases.count(b) > 1)}); "
                            "choose one with --node ID")
    return jobs


def _chain_jobs(nodes: dict[str, Node], source: Node, chain: list[Node], models_dir: Path) -> list[Job]:
    """The jobs of one chain: its model file, and the text-encoder files its CLIP strengths go to."""
    lora_files = {n.id: _resolve(n, "lora_name", models_dir) for n in chain}
    jobs: list[Job] = []
    te_loras: dict[str, list[tuple[Node, Node]]] = {}  # CLIP source id -> [(lora node, source)]
    for n in chain:
        if n.type == "LoraLoader" and "clip" in n.links:
            clip_src = _source(nodes, n.links["clip"], "CLIP", [])
            te_loras.setdefault(clip_src.id, []).append((n, clip_src))
    if source.type == "CheckpointLoaderSimple":
        own = {n.id for n, _ in te_loras.get(source.id, [])}
        entries = [(lora_files[n.id], _strength(n, "strength_model"),
                    _strength(n, "strength_clip") if n.id in own else 0.0) for n in chain]
        jobs.append(Job(_resolve(source, "ckpt_name", models_dir), entries, False,
                        why=f"checkpoint of node {source.id}"))
    else:
        entries = [(lora_files[n.id], _strength(n, "strength_model"), 0.0) for n in chain]
        jobs.append(Job(_resolve(source, "unet_name", models_dir), entries, True, why=f"UNETLoader node {source.id}"))
    for sid, pairs in te_loras.items():
        src = pairs[0][1]
        if src.type == "CheckpointLoaderSimple":
            continue  # handled with the checkpoint
        fields = ["clip_name"] if src.type == "CLIPLoader" else ["clip_name1", "clip_name2"]
        entries = [(lora_files[n.id], _strength(n, "strength_clip"), _strength(n, "strength_clip")) for n, _ in pairs]
        if all(c == 0.0 for _, _, c in entries):
            continue
        for f in fields:
            jobs.append(Job(_resolve(src, f, models_dir), entries, False, why=f"{src.type} node {sid} ({f})"))
    return jobs


def assign_outputs(jobs: list[Job], out: str | None, *, make_folder: bool) -> None:
    """One job and OUT a file name: that file. Otherwise OUT is a folder (``baked/``; default: the
    current folder), made when its parent exists (``make_folder``), and each file is named after its
    base (``<base>_lorakit.safetensors``)."""
    if len(jobs) == 1 and out is not None and not is_folder(out):
        jobs[0].out = Path(out)
        return
    if out is not None and not is_folder(out):
        raise WorkflowError(f"{out}: the workflow bakes {len(jobs)} files ({', '.join(j.base.name for j in jobs)}); "
                            "give a folder as -o (a name ending with '/')")
    folder = Path(out) if out is not None else Path.cwd()
    if not folder.exists():
        if not folder.parent.is_dir():
            raise WorkflowError(f"{out}: folder {folder.parent} does not exist")
        if make_folder:
            folder.mkdir()
    names = set()
    for j in jobs:
        name = f"{j.base.stem}_lorakit.safetensors"
        if name in names:
            name = f"{j.base.stem}_{len(names)}_lorakit.safetensors"
        names.add(name)
        j.out = folder / name
