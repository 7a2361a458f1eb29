#!/usr/bin/env python3
"""The machine's pip configuration for an image build: scripts/build-image.sh.

Writes `pip config list` (every file and PIP_* variable, merged as pip merges them) to one pip.conf,
with each local file or folder it names (CA bundle, constraints, wheel folders, file:// indexes)
moved under PREFIX, and prints those local paths (a file:// index's parent folder, whose pages may
link to files beside it), one per line, for the build to mount at PREFIX/path. Under a prefix they
never cover a file of the image's own packages.

    image-pip-config.py OUT.conf PREFIX
"""

import os
import subprocess
import sys


def main(out: str, prefix: str) -> None:
    listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
    options: dict[str, str] = {}
    # Environment variables override the files, as in pip: they come last.
    for line in sorted(listed.splitlines(), key=lambda line: line.startswith(":env:")):
        key, _, value = line.partition("=")
        options[key.rpartition(".")[2]] = value.strip().strip("'\"")
    paths: set[str] = set()

    def moved(word: str) -> str:
        scheme = "file://" if word.startswith("file://") else ""
        path = word.removeprefix(scheme)
        if not (path.startswith("/") and os.path.exists(path)):
            return word
        # A local index's pages may link to files beside it (../files/x.whl): mount its parent.
        paths.add(os.path.dirname(path.rstrip("/")) if scheme else path)
        return scheme + prefix + path

    with open(out, "w") as f:
        if options:
            f.write("[global]\n")
            f.writelines(f"{key} = {' '.join(moved(w) for w in value.split())}\n" for key, value in options.items())
    print("\n".join(sorted(paths)))


if __name__ == "__main__":
    main(*sys.argv[1:3])
