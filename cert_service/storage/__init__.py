"""All of cert_service's SQL, a module per concern, and the row model it reads and writes.

* `base`: the records (`CertificateRecord` and its protobuf form), the SQL fragments several
  statements share, and the autocommit connection every statement runs on (`StoreBase`).
* `certificates`: device_certificates (provision, read, list, renew, revoke, delete, access
  counters) and `CertificateStore`, which joins it with `requests` (AIP-155 request ids),
  `lifecycle` (due renewals, expiry), `invalidations` (the cache invalidation log), `outbox`
  (the delete cascade) and `fleet` (the gauges' read).
* `queue`: the ACME order queue, revocations to send, the account and the order budget.
* `crls`: the revocation log, its queue and the stored CRLs.
* `acme_server`: the RFC 8555 server's EAB keys, accounts, nonces and orders.

Statements are literal and parameterized; the one that is composed (the list filters) is
assembled from fixed fragments with `psycopg.sql`. Time always comes from the caller (the
injected clock), never from the database's `now()`, so that tests can move time and replicas
agree on one notion of "now" per request.
"""

from cert_service.storage.base import (
    CANCEL_ISSUANCE,
    REASON_FROM_PB,
    REASON_TO_PB,
    STATUS_FROM_PB,
    STATUS_TO_PB,
    TYPE_TO_PB,
    CertificateRecord,
    CompletedRequest,
    Conflict,
    ListQuery,
    NewCertificate,
    NewRow,
    OutboxEvent,
    ProvisionedBy,
    RenewalSource,
    RequestTaken,
    StoreBase,
    to_pb_timestamp,
)
from cert_service.storage.certificates import CertificateStore
from cert_service.storage.crls import CrlStore, PublishedCrl, RevokedEntry
from cert_service.storage.fleet import FleetCounts
from cert_service.storage.queue import IssuanceJob, IssuanceQueue

__all__ = [
    "CANCEL_ISSUANCE",
    "REASON_FROM_PB",
    "REASON_TO_PB",
    "STATUS_FROM_PB",
    "STATUS_TO_PB",
    "TYPE_TO_PB",
    "CertificateRecord",
    "CertificateStore",
    "CompletedRequest",
    "Conflict",
    "CrlStore",
    "FleetCounts",
    "IssuanceJob",
    "IssuanceQueue",
    "ListQuery",
    "NewCertificate",
    "NewRow",
    "OutboxEvent",
    "ProvisionedBy",
    "PublishedCrl",
    "RenewalSource",
    "RequestTaken",
    "RevokedEntry",
    "StoreBase",
    "to_pb_timestamp",
]
