"""Push login (S7): open a session with a smartphone token over an encrypted notification service.

* :mod:`~keybroker.flows.pushauth.messages` — challenge, answer, token and log entry messages;
* :mod:`~keybroker.flows.pushauth.protocol` — the sans-IO protocol (transition table, checks);
* :mod:`~keybroker.flows.pushauth.server` — the authentication server inside the broker;
* :mod:`~keybroker.flows.pushauth.phone` / :mod:`~keybroker.flows.pushauth.terminal` — drivers;
* :mod:`~keybroker.flows.pushauth.cli` — ``keybroker pushauth|phone|login``.

See ``docs/pushauth.md``.
"""
