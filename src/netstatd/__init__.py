"""netstatd: real-time network connection monitoring for Kubernetes nodes with eBPF."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("netstatd")
except PackageNotFoundError:  # running from a source tree without install
    __version__ = "0.0.0+src"
