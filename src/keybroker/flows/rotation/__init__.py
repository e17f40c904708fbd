"""S10 — staged key rotation across upstream and downstream sites.

One symmetric key per link (upstream node ↔ downstream site). A rollout gives
each link a new key version, delivers it to the downstream site first (receive
installed, old and new accepted), and only once that site has acknowledged it
with proof of possession delivers it to the matching upstream node (transmit
switched). A link whose downstream site fails keeps its original key.

Modules: :mod:`.topology` (sites, nodes, links), :mod:`.protocol` (the sans-IO
per-link state machine and its transition table), :mod:`.orchestrator` (the
durable driver inside the broker), :mod:`.agent` (the site/node agent),
:mod:`.traffic` (the data plane used to show that no message is lost),
:mod:`.cli` (``keybroker rotation …`` and ``keybroker agent``).
"""
