"""What the containerd follower reports, one change at a time, to the callback the agent gives it.

The follower never touches the node state: it says what it learned, and the agent applies it
(state.containers.ContainerIndex.apply) and publishes the resulting events. Every change is
idempotent: applying one twice, or an older one after a newer listing, converges on containerd's state.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .records import Container, Pod


@dataclass(frozen=True, slots=True)
class Listed:
    """A full listing after a (re)connect: these pods and containers are the whole truth now."""

    pods: tuple[Pod, ...]  # pods known from their sandbox (CRI, or the sandbox container's labels)
    containers: tuple[Container, ...]  # pods known only from containers' labels travel in them


@dataclass(frozen=True, slots=True)
class PodSeen:
    """A pod's sandbox was (re)read: add or replace the pod."""

    pod: Pod


@dataclass(frozen=True, slots=True)
class PodGone:
    """A pod's sandbox container was deleted."""

    sandbox_id: str


@dataclass(frozen=True, slots=True)
class ContainerSeen:
    """A container was created, updated or started: add or replace it."""

    container: Container


@dataclass(frozen=True, slots=True)
class ContainerGone:
    """A container was deleted (or is no longer listed)."""

    container_id: str


@dataclass(frozen=True, slots=True)
class TaskStarted:
    """A task started in a network namespace: the agent scans its listeners."""

    netns: int  # inode
    path: str  # a path that opens it (/proc/PID/ns/net of the started task)


IndexChange = Listed | PodSeen | PodGone | ContainerSeen | ContainerGone
Change = IndexChange | TaskStarted
OnChange = Callable[[Change], None]
