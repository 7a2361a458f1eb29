import pytest

from netstatd.testing.containerd import PrivateContainerd
from netstatd.testing.hosts import HostPair
from netstatd.testing.stream import StreamClient
from tests.conftest import own_agent, require_root


@pytest.fixture(scope="module")
def hosts():
    require_root()
    with HostPair() as pair:
        yield pair


@pytest.fixture(scope="module")
def ctd():
    """A private containerd with CRI (one per test module that asks for it)."""
    require_root()
    with PrivateContainerd() as env:
        yield env


@pytest.fixture(scope="module")
def host_ip(ctd):
    """The host's address on the pod bridge, where pods and host talk."""
    return ctd.bridge_address()


@pytest.fixture(scope="module")
def agent(tmp_path_factory):
    yield from own_agent(tmp_path_factory, "--log-level", "debug")


@pytest.fixture(scope="module")
def ctd_agent(ctd, tmp_path_factory):
    """An agent following the module's private containerd."""
    yield from own_agent(tmp_path_factory, "--log-level", "debug", env={"CONTAINERD_SOCKET": ctd.socket})


@pytest.fixture
def stream(agent):
    with StreamClient(agent.ws_url) as client:
        client.wait_snapshot()
        yield client
