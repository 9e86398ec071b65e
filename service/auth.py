"""API keys: random bearer tokens, stored as SHA-256 hashes, each belonging to one tenant."""

from __future__ import annotations

import hashlib
import secrets
from typing import Annotated

from fastapi import Depends
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import ScalarSelect, select
from sqlalchemy.orm import Session

from service.db import get_session
from service.errors import Unauthorized
from service.models import ApiKey, Tenant, utcnow

KEY_PREFIX = "dpft_"


def hash_key(key: str) -> str:
    # Keys carry 256 random bits, so a fast hash is enough: there is nothing to brute-force.
    return hashlib.sha256(key.encode()).hexdigest()


def create_api_key(session: Session, tenant_name: str, key: str | None = None) -> str:
    """Create the tenant if needed and a new key for it; returns the key in clear (shown once)."""
    tenant = session.scalar(select(Tenant).where(Tenant.name == tenant_name))
    if tenant is None:
        tenant = Tenant(name=tenant_name)
        session.add(tenant)
        session.flush()
    key = key or KEY_PREFIX + secrets.token_urlsafe(32)
    key_hash = hash_key(key)
    if session.scalar(select(ApiKey).where(ApiKey.key_hash == key_hash)) is None:
        session.add(ApiKey(tenant_id=tenant.id, key_hash=key_hash, prefix=key[:12]))
    return key


def revoke_api_key(session: Session, key_or_prefix: str) -> ApiKey:
    """Revoke the key given in full, or by the prefix `dpft keys list` shows."""
    if key_or_prefix.startswith(KEY_PREFIX) and len(key_or_prefix) > 20:
        matches = session.scalars(select(ApiKey).where(ApiKey.key_hash == hash_key(key_or_prefix))).all()
    else:
        matches = session.scalars(select(ApiKey).where(ApiKey.prefix == key_or_prefix)).all()
    if len(matches) != 1:
        raise LookupError(f"{len(matches)} keys match {key_or_prefix!r}; give the whole key or a unique prefix")
    key = matches[0]
    if key.revoked_at is None:
        key.revoked_at = utcnow()
    return key


def ensure_configured_keys(session: Session, pairs: str) -> None:
    """Store the `tenant:key` pairs from DPFT_API_KEYS (idempotent)."""
    for pair in filter(None, (p.strip() for p in pairs.split(","))):
        tenant_name, sep, key = pair.partition(":")
        if not sep or not tenant_name or not key:
            raise ValueError(f"DPFT_API_KEYS entry {pair!r} is not of the form tenant:key")
        create_api_key(session, tenant_name, key)


bearer_scheme = HTTPBearer(auto_error=False, description="An API key from `dpft keys create`.")


Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)]


def current_tenant(session: Annotated[Session, Depends(get_session)], credentials: Credentials) -> Tenant:
    """FastAPI dependency: the tenant whose (unrevoked) key is in the Authorization header."""
    if credentials is None or not credentials.credentials.strip():
        raise Unauthorized("Missing API key: send `Authorization: Bearer <key>` (create one with `dpft keys create`).")
    tenant = session.scalar(select(Tenant).where(Tenant.id == tenant_of_key(credentials)))
    if tenant is None:
        raise Unauthorized("Invalid or revoked API key.")
    return tenant


def tenant_of_key(credentials: HTTPAuthorizationCredentials | None) -> ScalarSelect[str]:
    """SQL for the tenant id of the unrevoked key in ``credentials`` (NULL for none), to fold the
    key check into a hot query; `current_tenant` tells a bad key (401) from the rest."""
    token = credentials.credentials.strip() if credentials is not None else ""
    return (
        select(ApiKey.tenant_id)
        .where(ApiKey.key_hash == hash_key(token), ApiKey.revoked_at.is_(None))
        .scalar_subquery()
    )


CurrentTenant = Annotated[Tenant, Depends(current_tenant)]
DbSession = Annotated[Session, Depends(get_session)]
