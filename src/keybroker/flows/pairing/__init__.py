"""S9 — certificate-checked common-key transport between devices (``keybroker pair``).

A controller (device A, a broker principal holding the common keyset) obtains a
device's certificate chain and a fresh signature from it, verifies the chain
against manufacturer roots and CRLs *and* the certificate's identification info
and key hash against the device's out-of-band pairing code, and only then sends
the common key sealed to the device's certified key (HPKE DHKEM(P-256), or
RSA-OAEP for RSA devices). The device confirms with a MAC over the transcript;
then both talk under the common key.

* :mod:`.code` — the ``keybroker-pair:`` code on the device's label;
* :mod:`.messages` — the wire messages; :mod:`.refusals` — why a device is refused;
* :mod:`.verification` — the controller's checks; :mod:`.protocol` — the sans-IO
  state machines; :mod:`.controller`, :mod:`.device` — asyncio drivers;
* :mod:`.manufacturer` — a manufacturer PKI (root, intermediate, devices, CRLs);
* :mod:`.cli` — ``keybroker pair controller|device|code``; :mod:`.demo` — the demo stage.
"""
