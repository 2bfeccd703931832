"""The ApiKeyService servicer: validation at the top, then storage and cache.

Handlers raise `DomainError`; the shared interceptor turns it into a status.
Caller identity comes from the gateway's headers (`shared.identity`): a
device key acts only on its own device; operator keys and internal callers
act on any.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from typing import Any, Final

import grpc

from key_service import keyformat, pagination, validation
from key_service.config import KeyServiceConfig
from key_service.devices import DeviceDirectory
from key_service.permissions import ADMIN, DEFAULT_PERMISSIONS, KNOWN
from key_service.storage import (
    ACTION_CASCADE_REVOKE,
    ACTION_CREATE,
    ACTION_REVOKE,
    ApiKeyRow,
    AuditEntry,
    KeyChange,
    KeyStore,
    NewKeyRow,
)
from key_service.verify import Verdict, Verifier
from myl.key.v1 import key_pb2, key_pb2_grpc
from shared import idempotency
from shared.clock import Clock
from shared.errors import (
    DomainError,
    failed_precondition,
    invalid_argument,
    not_found,
    permission_denied,
)
from shared.idempotency import RequestKey
from shared.identity import Caller, caller_from_metadata
from shared.limits import Bucket, Limiter, LimitName

Context = grpc.aio.ServicerContext[Any, Any]

# Internal callers (no gateway identity) may name themselves for the audit trail.
ACTOR_HEADER: Final = "x-myl-actor"
_ACTOR: Final = re.compile(r"[a-z0-9][a-z0-9_.:-]{0,63}", re.ASCII)
# RevokeDeviceApiKeys from an internal caller with a reason starting with this
# is the cascade that follows a device's deletion (cert_service's outbox); its
# actor is cert_service unless the caller names itself.
CASCADE_REASON_PREFIX: Final = "device deleted"
CASCADE_ACTOR: Final = "cert_service"


def actor_of(caller: Caller, metadata: Iterable[tuple[str, Any]] | None) -> str:
    """How the audit trail names the caller.

    Gateway callers: `device-key:<id>` / `operator-key:<id>`. Internal callers:
    the `x-myl-actor` header when it is a plain name (e.g. `cert_service`),
    else `internal`. The header is ignored for gateway callers.
    """
    if not caller.internal:
        return caller.actor
    for name, value in metadata or ():
        if name == ACTOR_HEADER and isinstance(value, str) and _ACTOR.fullmatch(value):
            return value
    return "internal"


def verify_response(verdict: Verdict) -> key_pb2.VerifyApiKeyResponse:
    record = verdict.record
    response = key_pb2.VerifyApiKeyResponse()
    if record is None:
        response.result = verdict.result  # type: ignore[assignment]
        return response
    response.CopyFrom(record.template)
    response.result = verdict.result  # type: ignore[assignment]
    decision = verdict.decision
    if decision is not None:
        response.rate_limit_remaining = decision.remaining
        response.rate_limit_reset.FromMicroseconds(decision.reset_us)
        if decision.retry_after_us:
            response.retry_after.FromMicroseconds(decision.retry_after_us)
    return response


class ApiKeyServicer(key_pb2_grpc.ApiKeyServiceServicer):
    def __init__(
        self,
        *,
        config: KeyServiceConfig,
        store: KeyStore,
        verifier: Verifier,
        devices: DeviceDirectory,
        clock: Clock,
        limiter: Limiter | None = None,
    ) -> None:
        self.config = config
        self.limiter = limiter
        self.store = store
        self.verifier = verifier
        self.devices = devices
        self.clock = clock
        self.max_ttl = timedelta(days=config.max_key_ttl_days)
        self.default_ttl = timedelta(days=config.default_key_ttl_days)

    # -- issue ---------------------------------------------------------------

    async def GenerateApiKey(
        self, request: key_pb2.GenerateApiKeyRequest, context: Context
    ) -> key_pb2.GenerateApiKeyResponse:
        metadata = context.invocation_metadata()
        device_id = validation.device_id(request.device_id)
        device_name = validation.text(
            request.device_name, "device_name", validation.MAX_DEVICE_NAME
        )
        initials = validation.text(
            request.user_initials, "user_initials", validation.MAX_USER_INITIALS
        )
        subdomain = validation.subdomain(request.uuid_subdomain) if request.uuid_subdomain else ""
        permissions = validation.device_key_permissions(request.permissions) or DEFAULT_PERMISSIONS
        rate_limit = validation.rate_limit(
            request.rate_limit, self.config.default_rate_limit, self.config.max_rate_limit
        )
        now = self.clock.now()
        request_key = idempotency.request_key("generate", request)
        caller = caller_from_metadata(metadata)
        caller.require_device(device_id)
        _require_grantable(caller, permissions)
        # A retry whose key was revoked, rotated or expired since is refused before anything
        # else (its expire_time, say, may lie in the past now); one whose key is live gets a
        # replacement with that key's own attributes: defaults computed now (the expiry)
        # would extend it.
        earlier = await self._earlier_attempt(request_key, now)
        if earlier is not None:
            permissions = tuple(earlier.permissions)
            rate_limit, expires_at = earlier.rate_limit, earlier.expires_at
            device_name, initials = earlier.device_name, earlier.user_initials
        else:
            expires_at = (
                validation.expire_time(request.expire_time, now=now, maximum=self.max_ttl)
                if request.HasField("expire_time")
                else now + self.default_ttl
            )
            if not (caller.internal or ADMIN in caller.permissions):
                rate_limit, expires_at = await self._within_callers_own_key(
                    caller, request, rate_limit, expires_at
                )
        certificate = await self.devices.active_certificate(device_id, now)
        if subdomain and subdomain not in (
            certificate.uuid_subdomain,
            certificate.uuid_subdomain.split(".", 1)[0],
        ):
            raise invalid_argument(
                "uuid_subdomain", "does not match the device's certificate; leave it empty"
            )
        # NewApiKeysPerDevice: every caller, every new key but an AIP-155 retry's replacement.
        spend = (
            await self.limiter.spend(Bucket(LimitName.NEW_API_KEYS_PER_DEVICE, device_id))
            if self.limiter is not None and earlier is None
            else None
        )
        try:
            return await self._generate(
                caller,
                metadata,
                device_id,
                device_name,
                initials,
                earlier.uuid_subdomain if earlier is not None else certificate.uuid_subdomain,
                permissions,
                rate_limit,
                expires_at,
                now,
                request_key,
                earlier,
            )
        except Exception:
            if spend is not None:
                await spend.refund()
            raise

    async def _generate(
        self,
        caller: Caller,
        metadata: Any,
        device_id: str,
        device_name: str,
        initials: str,
        uuid_subdomain: str,
        permissions: Sequence[str],
        rate_limit: int,
        expires_at: datetime,
        now: datetime,
        request_key: RequestKey | None,
        earlier: ApiKeyRow | None,
    ) -> key_pb2.GenerateApiKeyResponse:
        new_key = keyformat.generate()
        row, superseded = await self.store.create(
            NewKeyRow(
                id=uuid.uuid4(),
                device_id=device_id,
                key_hash=new_key.key_hash,
                key_prefix=new_key.display_prefix,
                device_name=device_name,
                user_initials=initials,
                uuid_subdomain=uuid_subdomain,
                permissions=permissions,
                rate_limit=rate_limit,
                expires_at=expires_at,
            ),
            AuditEntry(ACTION_CREATE, actor_of(caller, metadata), "generated"),
            now,
            request=request_key,
            supersedes=earlier,
        )
        await self.verifier.publish(superseded)
        # Check the device again now that the key exists: a DeleteDevice whose key
        # revocation ran between the first check and the insert would otherwise
        # miss this key. Either that revocation sees the key, or this check sees
        # the device gone and the key is revoked before anyone learns it.
        try:
            await self.devices.active_certificate(device_id, self.clock.now())
        except DomainError:
            change = await self.store.revoke(
                row.id,
                AuditEntry(ACTION_REVOKE, "key_service", "device deleted while the key was issued"),
                self.clock.now(),
            )
            await self.verifier.publish(change)
            raise
        return key_pb2.GenerateApiKeyResponse(api_key=new_key.plaintext, key=row.to_pb(now))

    async def _earlier_attempt(self, key: RequestKey | None, now: datetime) -> ApiKeyRow | None:
        """The key an earlier attempt of this AIP-155 request created, still live (a retry
        supersedes it: its plaintext was shown once, maybe to nobody), or None.

        FAILED_PRECONDITION `REQUEST_SUPERSEDED` when that key was revoked, rotated or
        expired since: a retry never brings back a key the current state refuses. The
        store checks again, with the key locked, in the transaction that supersedes it."""
        if key is None:
            return None
        found = await self.store.find_by_request_id(key.request_id)
        if found is None:
            return None
        row, fingerprint = found
        if not idempotency.recent(row.created_at, now):
            return None
        key.matches(fingerprint)
        refusal = row.replay_refusal(now)
        if refusal is not None:
            raise idempotency.superseded(key.request_id, refusal, key_id=str(row.id))
        return row

    async def _within_callers_own_key(
        self,
        caller: Caller,
        request: key_pb2.GenerateApiKeyRequest,
        rate_limit: int,
        expires_at: datetime,
    ) -> tuple[int, datetime]:
        """A key without `admin` cannot mint a key that outlives it or that may
        call more often than it may: explicit requests beyond its own limits are
        refused, defaults are capped to them."""
        own = await self.store.get(uuid.UUID(caller.key_id)) if caller.key_id else None
        if own is None:
            raise permission_denied("the calling key is unknown", "CALLER_KEY_UNKNOWN")
        if request.rate_limit and rate_limit > own.rate_limit:
            raise permission_denied(
                "a key cannot grant a higher rate limit than its own", "RATE_LIMIT_NOT_GRANTABLE"
            )
        if request.HasField("expire_time") and expires_at > own.expires_at:
            raise permission_denied(
                "a key cannot grant a key that outlives it", "EXPIRY_NOT_GRANTABLE"
            )
        return min(rate_limit, own.rate_limit), min(expires_at, own.expires_at)

    # -- verify (internal) ---------------------------------------------------

    async def VerifyApiKey(
        self, request: key_pb2.VerifyApiKeyRequest, context: Context
    ) -> key_pb2.VerifyApiKeyResponse:
        api_key = request.api_key
        if not api_key:
            raise invalid_argument("api_key", "is required")
        required = request.required_permissions
        if required:
            for index, permission in enumerate(required):
                if permission not in KNOWN:
                    raise invalid_argument(f"required_permissions[{index}]", "unknown permission")
        verdict = await self.verifier.verify(api_key, required, request.dry_run)
        return verify_response(verdict)

    # -- read ----------------------------------------------------------------

    async def GetApiKey(
        self, request: key_pb2.GetApiKeyRequest, context: Context
    ) -> key_pb2.GetApiKeyResponse:
        key_id = validation.key_id(request.key_id)
        caller = caller_from_metadata(context.invocation_metadata())
        row = await self._load(key_id, caller)
        return key_pb2.GetApiKeyResponse(key=row.to_pb(self.clock.now()))

    async def ListApiKeys(
        self, request: key_pb2.ListApiKeysRequest, context: Context
    ) -> key_pb2.ListApiKeysResponse:
        device_id = validation.device_id(request.device_id)
        size = pagination.page_size(request.page_size)
        filters = (device_id, str(request.show_inactive))
        after = pagination.parse_key_page_token(request.page_token, *filters)
        caller_from_metadata(context.invocation_metadata()).require_device(device_id)
        now = self.clock.now()
        rows = await self.store.list_device_keys(
            device_id, now=now, show_inactive=request.show_inactive, after=after, limit=size + 1
        )
        response = key_pb2.ListApiKeysResponse(keys=[r.to_pb(now) for r in rows[:size]])
        if len(rows) > size:
            last = rows[size - 1]
            response.next_page_token = pagination.key_page_token(last.created_at, last.id, *filters)
        return response

    async def ListAuditEvents(
        self, request: key_pb2.ListAuditEventsRequest, context: Context
    ) -> key_pb2.ListAuditEventsResponse:
        device_id = validation.optional_device_id(request.device_id)
        key_id = validation.optional_key_id(request.key_id)
        size = pagination.page_size(request.page_size)
        filters = (request.device_id, request.key_id)
        before = pagination.parse_audit_page_token(request.page_token, *filters)
        caller = caller_from_metadata(context.invocation_metadata())
        if not caller.internal and ADMIN not in caller.permissions:
            raise permission_denied("the audit trail needs the admin permission", "ADMIN_ONLY")
        rows = await self.store.list_audit(
            device_id=device_id, key_id=key_id, before=before, limit=size + 1
        )
        response = key_pb2.ListAuditEventsResponse(events=[r.to_pb() for r in rows[:size]])
        if len(rows) > size:
            response.next_page_token = pagination.audit_page_token(rows[size - 1].seq, *filters)
        return response

    # -- change --------------------------------------------------------------

    async def RotateApiKey(
        self, request: key_pb2.RotateApiKeyRequest, context: Context
    ) -> key_pb2.RotateApiKeyResponse:
        metadata = context.invocation_metadata()
        key_id = validation.key_id(request.key_id)
        grace = validation.grace_period(request.grace_period)
        request_key = idempotency.request_key("rotate", request)
        caller = caller_from_metadata(metadata)
        current = await self._load(key_id, caller)
        cap = await self._rotation_cap(caller, current)
        now = self.clock.now()
        earlier = await self._earlier_attempt(request_key, now)
        if earlier is not None:
            return await self._rotate_again(earlier, current, request_key, caller, metadata, now)
        # No cert_service call: an active key implies its device exists (deleting
        # a device revokes its keys), and rotating a leaked key must not wait
        # for another service.
        _require_rotatable(current, now)
        new_key = keyformat.generate()
        async with self.store.rotation(current.device_id, request_key, now) as conn:
            old = await self.store.lock_for_rotation(conn, key_id)
            assert old is not None  # keys are never deleted
            _require_rotatable(old, now)
            lifetime = min(old.expires_at - old.created_at, self.max_ttl)
            retired, created, invalidations = await self.store.finish_rotation(
                conn,
                old,
                NewKeyRow(
                    id=uuid.uuid4(),
                    device_id=old.device_id,
                    key_hash=new_key.key_hash,
                    key_prefix=new_key.display_prefix,
                    device_name=old.device_name,
                    user_initials=old.user_initials,
                    uuid_subdomain=old.uuid_subdomain,
                    permissions=old.permissions,
                    rate_limit=old.rate_limit,
                    expires_at=min(now + max(lifetime, timedelta(minutes=1)), cap),
                    rotated_from=old.id,
                ),
                retire_at=now + grace,
                actor=actor_of(caller, metadata),
                now=now,
                request=request_key,
            )
        await self.verifier.publish(KeyChange([retired], invalidations))
        return key_pb2.RotateApiKeyResponse(
            api_key=new_key.plaintext, key=created.to_pb(now), previous_key=retired.to_pb(now)
        )

    async def _rotate_again(
        self,
        earlier: ApiKeyRow,
        current: ApiKeyRow,
        request_key: RequestKey | None,
        caller: Caller,
        metadata: Any,
        now: datetime,
    ) -> key_pb2.RotateApiKeyResponse:
        """A retry of a rotation that succeeded, whose new key is still live: that key is
        revoked and another takes its place, with the same attributes and expiry; the rotated
        key's grace stays as it was. (Whether the rotated key itself is still usable does not
        matter: the rotation retired it.)"""
        new_key = keyformat.generate()
        created, superseded = await self.store.create(
            NewKeyRow(
                id=uuid.uuid4(),
                device_id=earlier.device_id,
                key_hash=new_key.key_hash,
                key_prefix=new_key.display_prefix,
                device_name=earlier.device_name,
                user_initials=earlier.user_initials,
                uuid_subdomain=earlier.uuid_subdomain,
                permissions=earlier.permissions,
                rate_limit=earlier.rate_limit,
                expires_at=earlier.expires_at,
                rotated_from=earlier.rotated_from,
            ),
            AuditEntry(ACTION_CREATE, actor_of(caller, metadata), f"rotation of {current.id}"),
            now,
            request=request_key,
            supersedes=earlier,
        )
        await self.verifier.publish(superseded)
        return key_pb2.RotateApiKeyResponse(
            api_key=new_key.plaintext, key=created.to_pb(now), previous_key=current.to_pb(now)
        )

    async def RevokeApiKey(
        self, request: key_pb2.RevokeApiKeyRequest, context: Context
    ) -> key_pb2.RevokeApiKeyResponse:
        metadata = context.invocation_metadata()
        key_id = validation.key_id(request.key_id)
        reason = validation.text(request.reason, "reason", validation.MAX_REASON)
        # Revoking again changes nothing: a retry returns the key, revoked by the first attempt.
        idempotency.parse_request_id(request.request_id)
        caller = caller_from_metadata(metadata)
        await self._load(key_id, caller)
        now = self.clock.now()
        change = await self.store.revoke(
            key_id, AuditEntry(ACTION_REVOKE, actor_of(caller, metadata), reason), now
        )
        row = change.rows[0]  # keys are never deleted
        await self.verifier.publish(change)
        return key_pb2.RevokeApiKeyResponse(key=row.to_pb(now))

    async def RevokeDeviceApiKeys(
        self, request: key_pb2.RevokeDeviceApiKeysRequest, context: Context
    ) -> key_pb2.RevokeDeviceApiKeysResponse:
        metadata = context.invocation_metadata()
        device_id = validation.device_id(request.device_id)
        reason = validation.text(request.reason, "reason", validation.MAX_REASON)
        # A retry returns the first attempt's count and revokes nothing created since.
        request_key = idempotency.request_key("revoke_device", request)
        caller = caller_from_metadata(metadata)
        caller.require_device(device_id)
        actor = actor_of(caller, metadata)
        cascade = caller.internal and reason.lower().startswith(CASCADE_REASON_PREFIX)
        if cascade and actor == "internal":
            actor = CASCADE_ACTOR
        action = ACTION_CASCADE_REVOKE if cascade else ACTION_REVOKE
        change, revoked = await self.store.revoke_device(
            device_id, AuditEntry(action, actor, reason), self.clock.now(), request_key
        )
        await self.verifier.publish(change)
        return key_pb2.RevokeDeviceApiKeysResponse(revoked_count=revoked)

    async def _rotation_cap(self, caller: Caller, target: ApiKeyRow) -> datetime:
        """What a caller may not grant it may not obtain by rotation either.

        A key without `admin` that rotates another key must hold every permission
        of that key and at least its rate limit (else PERMISSION_DENIED, as for
        GenerateApiKey), and the new key cannot outlive the caller's own.
        Rotating one's own key, admin keys and internal callers: no cap.
        """
        if caller.internal or ADMIN in caller.permissions or caller.key_id == str(target.id):
            return datetime.max.replace(tzinfo=target.expires_at.tzinfo)
        own = await self.store.get(uuid.UUID(caller.key_id)) if caller.key_id else None
        if own is None:
            raise permission_denied("the calling key is unknown", "CALLER_KEY_UNKNOWN")
        _require_grantable(caller, target.permissions)
        if target.rate_limit > own.rate_limit:
            raise permission_denied(
                "a key cannot rotate a key with a higher rate limit than its own",
                "RATE_LIMIT_NOT_GRANTABLE",
            )
        return own.expires_at

    # -- helpers -------------------------------------------------------------

    async def _load(self, key_id: uuid.UUID, caller: Caller) -> ApiKeyRow:
        row = await self.store.get(key_id)
        # Another device's key (or an operator key) is answered like a key that does
        # not exist: a device key learns nothing about ids outside its device.
        if row is None or not caller.may_act_on(row.device_id or ""):
            raise not_found("API key", "API_KEY_NOT_FOUND", key_id=str(key_id))
        return row


def _require_grantable(caller: Caller, permissions: Iterable[str]) -> None:
    """A key may hand out only permissions it holds itself (admin: any)."""
    if caller.internal or ADMIN in caller.permissions:
        return
    missing = sorted(set(permissions) - caller.permissions)
    if missing:
        raise permission_denied(
            "a key cannot grant permissions it does not hold: " + ", ".join(missing),
            "PERMISSION_NOT_GRANTABLE",
        )


def _require_rotatable(row: ApiKeyRow, now: datetime) -> None:
    if row.status(now) != key_pb2.API_KEY_STATUS_ACTIVE:
        raise failed_precondition(
            "only an active key can be rotated", "API_KEY_NOT_ACTIVE", key_id=str(row.id)
        )
    if row.revoked_at is not None:
        raise failed_precondition(
            "this key was rotated already and is being retired",
            "API_KEY_ALREADY_ROTATED",
            key_id=str(row.id),
        )
