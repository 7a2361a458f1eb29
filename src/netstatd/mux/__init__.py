"""The cluster-wide multiplexer (docs/multiplexer.md): every node's stream, merged, on --http-mux-port."""
