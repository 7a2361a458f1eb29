"""The image `make image` builds (scripts/build-image.sh), handed to a test's containerd."""

from __future__ import annotations

import shutil
import subprocess

TAG = "netstatd:0.1.0"  # scripts/build-image.sh's default, the DaemonSet's image


def builder() -> str:
    """podman or buildah, whichever the build used (podman first, as the script chooses)."""
    return next((b for b in ("podman", "buildah") if shutil.which(b)), "")


def built(tag: str = TAG) -> bool:
    b = builder()
    if not b:
        return False
    cmd = [b, "image", "exists", tag] if b == "podman" else [b, "inspect", "--type", "image", tag]
    return subprocess.run(cmd, capture_output=True).returncode == 0


def save(path: str, tag: str = TAG) -> None:
    """Write the image as an OCI archive (what `ctr images import` reads)."""
    b = builder()
    cmd = (
        [b, "save", "--format", "oci-archive", "-o", path, tag]
        if b == "podman"
        else [b, "push", tag, f"oci-archive:{path}"]
    )
    subprocess.run(cmd, check=True, capture_output=True)


def normalized(reference: str) -> str:
    """The name containerd resolves a manifest's image reference to (`x:tag` -> docker.io/library/x:tag)."""
    name, _, tag = reference.rpartition(":") if ":" in reference.rsplit("/", 1)[-1] else (reference, "", "latest")
    first = name.split("/", 1)[0]
    if "/" not in name:
        name = f"docker.io/library/{name}"
    elif "." not in first and ":" not in first and first != "localhost":
        name = f"docker.io/{name}"
    return f"{name}:{tag}"
