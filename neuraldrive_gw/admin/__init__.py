"""Tenant and key administration on the SQLite store: what the CLI's commands do.

One module per concern: `tenants`, `keys`, and `common` (the AdminError they raise, input
parsing, name checks). Limit settings are parsed, checked and stored by `..limits`.
"""

from __future__ import annotations

from .common import MAX_LABEL, TENANT_NAME, AdminError, iso, parse_expiry, parse_moment
from .keys import (KeyInfo, create_key, get_key, list_keys, revoke_key, rotate_key,
                   set_key_limits)
from .tenants import (TenantInfo, create_tenant, delete_tenant, get_tenant, list_tenants,
                      set_tenant_limits, set_tenant_models)

__all__ = ["MAX_LABEL", "TENANT_NAME", "AdminError", "KeyInfo", "TenantInfo", "create_key",
           "create_tenant", "delete_tenant", "get_key", "get_tenant", "iso", "list_keys",
           "list_tenants", "parse_expiry", "parse_moment", "revoke_key", "rotate_key",
           "set_key_limits", "set_tenant_limits", "set_tenant_models"]
