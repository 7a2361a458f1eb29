"""A container's Kubernetes pod from its own labels, for when CRI has no sandbox for it.

containerd's CRI plugin sets io.kubernetes.pod.{name,namespace,uid} on every container it makes (the
sandbox's pause container included), and anything that makes containers for a pod by other means
(ctr, a CRI that is off or not answering) can carry them too. Such a container belongs to that pod.
"""

from __future__ import annotations

from .client import ContainerInfo
from .records import Pod

POD_NAME_LABEL = "io.kubernetes.pod.name"
POD_NAMESPACE_LABEL = "io.kubernetes.pod.namespace"
POD_UID_LABEL = "io.kubernetes.pod.uid"
KIND_LABEL = "io.cri-containerd.kind"  # "sandbox" or "container" on CRI-made containers
SANDBOX_ID_ANNOTATION = "io.kubernetes.cri.sandbox-id"
LABEL_SANDBOX_PREFIX = "labels:"


def pod_identity(labels: dict[str, str]) -> tuple[str, str, str] | None:
    """(name, namespace, uid) when all three pod labels are there and not empty."""
    ident = (labels.get(POD_NAME_LABEL), labels.get(POD_NAMESPACE_LABEL), labels.get(POD_UID_LABEL))
    if not all(ident):
        return None
    return ident  # type: ignore[return-value]


def label_sandbox_id(c: ContainerInfo, name: str, namespace: str, uid: str) -> str:
    """The sandbox id of a pod known from labels: CRI's own when the spec names it, else one made from
    the pod's identity, so every container of the pod (and every listing) gives the same."""
    return c.annotations.get(SANDBOX_ID_ANNOTATION) or f"{LABEL_SANDBOX_PREFIX}{namespace}/{name}/{uid}"


def pod_from_labels(c: ContainerInfo, host_network: bool, netns: int, netns_path: str) -> Pod | None:
    """The pod c's labels name, seen from c (its network namespace); None without the three labels.

    A sandbox container's labels are the pod's (its Kubernetes labels included); an ordinary
    container's carry only the identity, so the pod gets only that, the same from all its containers.
    """
    ident = pod_identity(c.labels)
    if ident is None:
        return None
    name, namespace, uid = ident
    if c.labels.get(KIND_LABEL) == "sandbox":
        labels = {k: v for k, v in c.labels.items() if k != KIND_LABEL}
    else:
        labels = {POD_NAME_LABEL: name, POD_NAMESPACE_LABEL: namespace, POD_UID_LABEL: uid}
    return Pod(
        sandbox_id=label_sandbox_id(c, name, namespace, uid),
        name=name,
        namespace=namespace,
        uid=uid,
        labels=labels,
        host_network=host_network,
        netns=netns,
        netns_path=netns_path,
    )
