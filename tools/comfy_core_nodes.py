"""Derive the list of ComfyUI's core node class names (tui_diffusion/graph/comfy_core_nodes.txt).

Validation uses the list to tell a node type ComfyUI itself ships (one this program does not implement yet)
from a custom node (not in ComfyUI's core). The list is derived, not hand-kept, from these sources:

- ComfyUI's ``nodes.py`` (its ``NODE_CLASS_MAPPINGS``) and any ``comfy_extras/*.py`` given (their
  ``NODE_CLASS_MAPPINGS`` keys and the ``node_id="..."`` of nodes declared with the newer schema);
- plain lists of names (one a line, ``#`` comments allowed) read off ComfyUI's ``comfy_extras/`` modules, the
  nodes its ``init_builtin_extra_nodes`` loads (where the source files themselves are not at hand; the list used
  for the shipped file is ``tools/comfy_extras_nodes.txt``, read off a code index that held some files only in older
  versions, so newer node names come in through the templates). ComfyUI's
  ``comfy_api_nodes/`` (paid partner API nodes) are not read; the templates below bring in those they use;
- ComfyUI's published workflow templates (the ``comfyui-workflow-templates`` packages, MIT): every node there
  whose ``properties.cnr_id`` is ``"comfy-core"``, the marker ComfyUI's frontend writes for core nodes;
- this program's own node specs (each mirrors the ComfyUI core node of the same name; its own extensions aside).

Usage: ``python tools/comfy_core_nodes.py [--comfy FILE_OR_FOLDER ...] [--names FILE ...] [--templates FOLDER ...]``;
it rewrites the list (sorted, one name a line, after a header saying what it came from).
Torch-free; run from the repository root.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tui_diffusion" / "graph" / "comfy_core_nodes.txt"
_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$", re.I)
_MAPPING = re.compile(r"NODE_CLASS_MAPPINGS\s*=\s*\{(.*?)\n\}", re.S)
_KEY = re.compile(r"""^\s*["']([^"']+)["']\s*:""", re.M)
_NODE_ID = re.compile(r"""node_id\s*=\s*["']([^"']+)["']""")


def from_source(path: Path) -> set[str]:
    """Node names a ComfyUI source file declares (or every ``*.py`` under a folder)."""
    files = sorted(path.rglob("*.py")) if path.is_dir() else [path]
    names: set[str] = set()
    for file in files:
        text = file.read_text(encoding="utf-8", errors="replace")
        for block in _MAPPING.findall(text):
            names.update(k.strip() for k in _KEY.findall(block))  # "ConditioningAverage " has a stray space
        names.update(_NODE_ID.findall(text))
    return names


def from_names(path: Path) -> set[str]:
    """Node names listed one a line in a plain text file (blank lines and ``#`` comments skipped)."""
    names: set[str] = set()
    for line in path.read_text(encoding="utf-8").splitlines():
        name = line.split("#", 1)[0].strip()
        if name:
            names.add(name)
    return names


def from_templates(folder: Path) -> set[str]:
    """Node types the published templates mark as ComfyUI core (subgraph instances and group nodes aside)."""
    names: set[str] = set()
    for file in sorted(folder.rglob("*.json")):
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError):
            continue
        if not isinstance(data, dict):
            continue
        graphs = [data, *((data.get("definitions") or {}).get("subgraphs") or [])]
        for graph in graphs:
            for node in graph.get("nodes") or [] if isinstance(graph, dict) else []:
                kind = node.get("type") if isinstance(node, dict) else None
                props = node.get("properties") if isinstance(node, dict) else None
                if (isinstance(kind, str) and isinstance(props, dict) and props.get("cnr_id") == "comfy-core"
                        and not _UUID.match(kind) and not kind.startswith("workflow")):
                    names.add(kind)
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--comfy", type=Path, action="append", default=[], help="ComfyUI nodes.py, a comfy_extras "
                        "file or folder")
    parser.add_argument("--names", type=Path, action="append", default=[], help="a plain list of node names "
                        "(one a line) read off ComfyUI's comfy_extras")
    parser.add_argument("--templates", type=Path, action="append", default=[], help="a folder of template JSON")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from tui_diffusion.graph.specs import NODE_SPECS

    names = {name for name, spec in NODE_SPECS.items() if not spec.extension}  # ours alone are not ComfyUI's
    sources = ["this program's node specs"]
    for path in args.comfy:
        names |= from_source(path)
        sources.append(f"ComfyUI source: {path.name}")
    for path in args.names:
        listed = from_names(path)
        names |= listed
        sources.append(f"names read off ComfyUI's comfy_extras modules: {len(listed)} names")
    for folder in args.templates:
        names |= from_templates(folder)
        sources.append(f"ComfyUI's published templates (comfyui-workflow-templates), nodes marked comfy-core: "
                       f"{len(list(folder.rglob('*.json')))} files")
    header = ["# ComfyUI's core node class names, one a line: derived by tools/comfy_core_nodes.py from",
              *(f"#   {s}" for s in sources),
              "# A node type missing here is reported as a custom node (not in ComfyUI's core)."]
    OUT.write_text("\n".join(header + sorted(names)) + "\n", encoding="utf-8")
    print(f"{OUT.relative_to(ROOT)}: {len(names)} names")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
