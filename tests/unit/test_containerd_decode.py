"""Decoding containerd events and container specs (no daemon)."""

import orjson
from google.protobuf import any_pb2, timestamp_pb2

from netstatd.sources.containerd.client import container_from_proto, event_from_envelope
from netstatd.sources.containerd.protos import containers_pb2, event_types_pb2, events_pb2


def envelope(msg, topic: str, type_url: str | None = None) -> events_pb2.Envelope:
    return events_pb2.Envelope(
        timestamp=timestamp_pb2.Timestamp(seconds=100, nanos=500_000_000),
        namespace="k8s.io",
        topic=topic,
        # containerd 1.6 sends the bare full name as type_url
        event=any_pb2.Any(type_url=type_url or msg.DESCRIPTOR.full_name, value=msg.SerializeToString()),
    )


def test_task_events():
    ev = event_from_envelope(envelope(event_types_pb2.TaskStart(container_id="c1", pid=42), "/tasks/start"))
    assert (ev.kind, ev.container_id, ev.pid, ev.timestamp, ev.namespace) == ("TaskStart", "c1", 42, 100.5, "k8s.io")
    init_exit = event_types_pb2.TaskExit(container_id="c1", id="c1", pid=42, exit_status=3)
    ev = event_from_envelope(envelope(init_exit, "/tasks/exit"))
    assert (ev.kind, ev.exec_id, ev.exit_status) == ("TaskExit", "", 3)
    exec_exit = event_types_pb2.TaskExit(container_id="c1", id="exec-7", pid=43, exit_status=0)
    ev = event_from_envelope(envelope(exec_exit, "/tasks/exit"))
    assert (ev.container_id, ev.exec_id, ev.pid, ev.exit_status) == ("c1", "exec-7", 43, 0)
    started = event_types_pb2.TaskExecStarted(container_id="c1", exec_id="exec-7", pid=43)
    ev = event_from_envelope(envelope(started, "/tasks/exec-started", "types.containerd.io/containerd.events.X"))
    assert ev.kind == "" and ev.container_id == ""  # unknown type: kept, not decoded
    ev = event_from_envelope(envelope(started, "/tasks/exec-started"))
    assert (ev.kind, ev.exec_id, ev.pid, ev.exit_status) == ("TaskExecStarted", "exec-7", 43, None)


def test_container_events():
    create = event_types_pb2.ContainerCreate(id="c2", image="busybox:1")
    ev = event_from_envelope(envelope(create, "/containers/create"))
    assert (ev.kind, ev.container_id, ev.image, ev.pid) == ("ContainerCreate", "c2", "busybox:1", 0)
    ev = event_from_envelope(envelope(event_types_pb2.ContainerDelete(id="c2"), "/containers/delete"))
    assert (ev.kind, ev.container_id) == ("ContainerDelete", "c2")


def test_container_spec_fields():
    spec = {
        "annotations": {"io.kubernetes.cri.sandbox-id": "sb1"},
        "linux": {
            "cgroupsPath": "/kubepods/besteffort/podU/c3",
            "namespaces": [{"type": "pid"}, {"type": "network", "path": "/proc/7/ns/net"}],
        },
    }
    c = containers_pb2.Container(
        id="c3",
        image="img",
        labels={"a": "b"},
        spec=any_pb2.Any(type_url="types.containerd.io/opencontainers/runtime-spec/1/Spec", value=orjson.dumps(spec)),
    )
    info = container_from_proto("k8s.io", c)
    assert info.cgroups_path == "/kubepods/besteffort/podU/c3"
    assert info.linux_namespaces == {"pid": "", "network": "/proc/7/ns/net"}
    assert info.pod_sandbox_id == "sb1" and info.labels == {"a": "b"}
    bad = container_from_proto("default", containers_pb2.Container(id="c4", spec=any_pb2.Any(value=b"not json")))
    assert (bad.cgroups_path, bad.linux_namespaces, bad.pod_sandbox_id) == ("", {}, "")
