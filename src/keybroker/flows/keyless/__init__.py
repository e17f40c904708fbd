"""S5 — keyless TLS: an edge that terminates TLS without the service's private key.

The edge peeks the ClientHello for the SNI, picks the service's certificate
chain, and forwards every private-key operation of the handshake to the key
server that holds the key, over mutual TLS, as a framed request (the
gokeyless-style protocol described in :mod:`.codes`).

Modules: :mod:`.codes` (tags, opcodes, error codes), :mod:`.protocol` (sans-IO
framing and connection state), :mod:`.operations` and :mod:`.pkcs11keys` (what
each opcode does to a key, in-process or in a PKCS#11 token), :mod:`.tlskeys`
(tlslite-ng key objects that forward every private-key operation), :mod:`.sni`
(the server name, peeked from the ClientHello before the handshake),
:mod:`.keyserver` and :mod:`.authz` (the key server: mutual TLS, pipelined
out-of-order replies, per-edge grants, metrics, reload on SIGHUP),
:mod:`.service_keys`, :mod:`.brokered` and :mod:`.cli` (service keys uploaded to
the broker, granted to edges, held by key-server principals; ``keybroker keyless``),
:mod:`.keyclient` (the edge's pipelined mutual-TLS client to key servers),
:mod:`.edge` (the TLS terminator: SNI routing, session tickets shared by its
worker processes, HTTP proxying to the origin).
"""
