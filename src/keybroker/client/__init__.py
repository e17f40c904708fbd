"""keybroker.client: the async Python SDK over the broker's HTTPS API.

* :class:`OperatorClient` — an operator with the admin token: enrolment
  tokens, principals, keysets, grants, deliveries, the log.
* :class:`PrincipalClient` — a principal: :meth:`~PrincipalClient.enrol`
  (identity + HPKE keys, CSR, signed binding), long-poll
  :meth:`~PrincipalClient.fetch_deliveries`, :meth:`~PrincipalClient.open_delivery`
  (broker signature checked against the pinned CA, HPKE-opened into the
  keyring), :meth:`~PrincipalClient.ack` (proof of possession). Every request
  is signed per RFC 9421.
* :class:`Keyring` — the principal's keys, encrypted at rest under a
  passphrase (scrypt) or a KEK.
* :class:`LogClient` — tree heads, inclusion and consistency proofs, all
  verified on this side.

TLS is pinned to the broker CA; errors arrive as :mod:`keybroker.errors` classes.
"""

from keybroker.client._http import raise_for_problem
from keybroker.client.keyring import KekSource, Keyring
from keybroker.client.logcheck import LogClient
from keybroker.client.operator import OperatorClient
from keybroker.client.principal import Delivery, PrincipalClient
from keybroker.client.signing import RequestSigner

__all__ = [
    "Delivery",
    "KekSource",
    "Keyring",
    "LogClient",
    "OperatorClient",
    "PrincipalClient",
    "RequestSigner",
    "raise_for_problem",
]
