"""States the kernel folds into a later record, shown by the sock_diag sweep while a socket stays in them."""

from tests.integration import peers
from tests.integration.test_kernel_events import finish, start_peer


def test_lasting_close_wait_and_fin_wait2_are_shown_then_closed_with_every_state(agent, hosts, stream):
    a, b = hosts.a, hosts.b
    server, port = start_peer(b, peers.TCP_CLOSE_ON_LINE_SERVER, b.ipv4)
    client, client_port = start_peer(a, peers.TCP_HALF_CLOSE_CLIENT, b.ipv4, str(port))
    try:

        def client_side(e):
            return e["type"] == "connection.event" and e["netns"] == a.netns_inode and e["localPort"] == client_port

        def server_side(e):
            return e["type"] == "connection.event" and e["netns"] == b.netns_inode and e["remotePort"] == client_port

        # no record marks these: only the sweep (every 2 s while the kernel folds) can show them
        swept_server = stream.wait_for(lambda e: server_side(e) and e["state"] == "CLOSE_WAIT")
        swept_client = stream.wait_for(lambda e: client_side(e) and e["state"] == "FIN_WAIT2")
        assert (swept_server["pid"], swept_server["localPort"], swept_server["direction"]) == (
            server.pid,
            port,
            "inbound",
        )
        assert (swept_client["pid"], swept_client["remotePort"], swept_client["direction"]) == (
            client.pid,
            port,
            "outbound",
        )
        assert agent.metric("netstatd_state_swept_total") >= 2
        assert agent.metric("netstatd_kernel_states_folded_total") >= 4  # SYN_RECV, FIN_WAIT1/2, CLOSE_WAIT

        server.stdin.write("close\n")
        server.stdin.flush()
        sclose = stream.wait_for(lambda e: server_side(e) and e["state"] == "CLOSE")
        cclose = stream.wait_for(lambda e: client_side(e) and e["state"] == "CLOSE")
    finally:
        finish(client, server)
    # the close carries every state folded since the socket's previous record, in order
    assert sclose["states"] == ["CLOSE_WAIT", "LAST_ACK", "CLOSE"]
    assert cclose["states"] == ["FIN_WAIT1", "FIN_WAIT2", "CLOSE"]
    assert (sclose["sockCookie"], sclose["pid"]) == (swept_server["sockCookie"], server.pid)
    assert (cclose["sockCookie"], cclose["pid"]) == (swept_client["sockCookie"], client.pid)
    for swept, close in ((swept_server, sclose), (swept_client, cclose)):
        cookie = close["sockCookie"]
        seen = [e["state"] for e in stream.matching(lambda e, c=cookie: e.get("sockCookie") == c)]
        assert seen.index(swept["state"]) < seen.index("CLOSE") == len(seen) - 1, seen
