"""The Deployment view's data, read from the manifests shipped in the package (the only copy)."""

from __future__ import annotations

import re
from importlib import resources
from importlib.resources.abc import Traversable
from typing import Any

# The top-level deploy/ of the repository is a symlink to this package folder.
DEPLOY_DIR = "deploy"
REPO_PATH = "deploy/"
COMMAND_PREFIX = "# $ "

_TOP_KEY = re.compile(r"^(kind|apiVersion):\s*(\S+)")
_META_KEY = re.compile(r"^  (name|namespace):\s*(\S+)")
_PORT_NAME = re.compile(r"^\s*- name:\s*(\S+)")
_PORT = re.compile(r"^\s*(containerPort|port):\s*(\d+)")


def manifests_dir() -> Traversable:
    return resources.files("netstatd").joinpath(DEPLOY_DIR)


def deployment_info(root: Traversable | None = None) -> dict[str, Any]:
    """Every manifest file, its documents (kind, name, namespace, ports, text) and the commands."""
    root = root or manifests_dir()
    files = []
    commands: list[str] = []
    for entry in sorted(root.iterdir(), key=lambda e: e.name):
        if not entry.name.endswith((".yaml", ".yml")):
            continue
        text = entry.read_text(encoding="utf-8")
        commands += [
            line[len(COMMAND_PREFIX) :].strip() for line in text.splitlines() if line.startswith(COMMAND_PREFIX)
        ]
        files.append({"path": REPO_PATH + entry.name, "text": text, "documents": split_documents(text)})
    return {"files": files, "commands": commands}


def split_documents(text: str) -> list[dict[str, Any]]:
    """The YAML documents with a kind; a line scan, enough for our own manifests (no YAML library)."""
    docs = []
    for chunk in re.split(r"^---\s*$", text, flags=re.MULTILINE):
        doc: dict[str, Any] = {"kind": None, "name": None, "namespace": None, "ports": [], "text": chunk.strip("\n")}
        in_meta = False
        port_name = None
        for line in chunk.splitlines():
            if m := _TOP_KEY.match(line):
                doc[m[1]] = m[2]
            if line and not line.startswith((" ", "#")):
                in_meta = line.startswith("metadata:")
            elif in_meta and (m := _META_KEY.match(line)):
                doc[m[1]] = m[2]
            if m := _PORT_NAME.match(line):
                port_name = m[1]
            elif (m := _PORT.match(line)) and port_name:
                doc["ports"].append({"name": port_name, "port": int(m[2])})
                port_name = None
        if doc["kind"]:
            docs.append(doc)
    return docs
